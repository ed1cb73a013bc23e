# `make demo`: set up (once) and register two shipped shapes into demo/.
# `make test`: set up (once) and run the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make install CONSTRAINTS=` installs the newest versions pyproject.toml allows (see README)
CONSTRAINTS ?= -c constraints.txt

# Headless rendering and a KeOps cache inside the repository's ignored .cache/.
export KEOPS_CACHE_FOLDER := $(CURDIR)/.cache/keops
export PYVISTA_OFF_SCREEN := true
export VTK_DEFAULT_OPENGL_WINDOW := vtkEGLRenderWindow
export MPLBACKEND := Agg

.PHONY: demo test install clean constraints

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

# Record the versions of the current .venv (after `make test` passed in it) as the new constraints.
constraints: $(STAMP)
	{ sed -n '1,2p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v -i '^shapeflow' \
	  | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

demo: $(STAMP)
	$(BIN)/shapeflow register assets/ant.ply assets/ant_bent.ply -o demo --gif demo/flow.gif --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .cache demo
