# `make demo`: set up (once) and register two shipped shapes into demo/.
# `make test`: set up (once) and run the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Headless rendering and a KeOps cache inside the repository's ignored .cache/.
export KEOPS_CACHE_FOLDER := $(CURDIR)/.cache/keops
export PYVISTA_OFF_SCREEN := true
export VTK_DEFAULT_OPENGL_WINDOW := vtkEGLRenderWindow
export MPLBACKEND := Agg

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/shapeflow register assets/ant.ply assets/ant_bent.ply -o demo --gif demo/flow.gif --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .cache demo
