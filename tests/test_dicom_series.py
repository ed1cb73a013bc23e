"""DICOM volumes: a folder of slices (one series) and multi-frame files, read into one 3D `sf.Image`.

The references are independent of shapeflow: series written here with pydicom from a known numpy
volume and known tags, world coordinates computed straight from ImagePositionPatient,
ImageOrientationPatient and PixelSpacing, SimpleITK's own series reader, and pydicom's pixel_array.
"""
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import shapeflow as sf
from shapeflow.grids import Grid

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import CTImageStorage, EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
COLUMNS, ROWS, SLICES = 7, 5, 6               # the known volume is (COLUMNS, ROWS, SLICES), i.e. (x, y, z)
PIXEL_SPACING = (0.8, 0.6)                    # DICOM order: between rows, between columns
GAP = 2.5


def oblique_cosines() -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction cosines of an oblique plane, rounded as a DS value holds them."""
    a, b, c = 0.4, -0.3, 0.25
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    rotation = rz @ ry @ rx
    return np.round(rotation[:, 0], 8), np.round(rotation[:, 1], 8)


class Series:
    """A known volume and the tags of its slices: slice k holds raw[:, :, k] (as (rows, columns))."""

    def __init__(self, step_sign: float = 1.0, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.raw = rng.integers(-500, 1500, size=(COLUMNS, ROWS, SLICES)).astype(np.int16)
        self.slopes = np.array([1.0, 0.5, 2.0, 0.25, 1.0, 4.0])[:SLICES]
        self.intercepts = np.array([-1024.0, -1000.0, 0.0, 12.5, -3.0, 100.0])[:SLICES]
        self.values = self.raw * self.slopes + self.intercepts            # the physical volume (x, y, z)
        self.row, self.column = oblique_cosines()
        self.normal = np.cross(self.row, self.column)
        start = np.array([-112.5, 43.25, 87.0])
        # positions as written (DS text, 5 decimals); step_sign -1 stores the volume against the normal
        self.positions = np.round(start + step_sign * GAP * np.arange(SLICES)[:, None] * self.normal, 5)
        self.uid = generate_uid()

    def datasets(self) -> list[Dataset]:
        return [self.dataset(k) for k in range(SLICES)]

    def dataset(self, k: int) -> Dataset:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality = self.uid, generate_uid(), "CT"
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = ROWS, COLUMNS
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness = 9.0                                     # deliberately not the slice spacing
        ds.ImagePositionPatient = [float(v) for v in self.positions[k]]
        ds.ImageOrientationPatient = [float(v) for v in (*self.row, *self.column)]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = float(self.slopes[k]), float(self.intercepts[k])
        ds.PixelData = np.ascontiguousarray(self.raw[:, :, k].T).astype("<i2").tobytes()
        return ds

    def world(self) -> np.ndarray:
        """RAS world position of every voxel (x, y, z, 3), straight from the DICOM tags:
        ImagePositionPatient[k] + i * PixelSpacing[1] * row + j * PixelSpacing[0] * column."""
        i, j, k = np.meshgrid(np.arange(COLUMNS), np.arange(ROWS), np.arange(SLICES), indexing="ij")
        lps = (self.positions[k] + (i * PIXEL_SPACING[1])[..., None] * self.row
               + (j * PIXEL_SPACING[0])[..., None] * self.column)
        return lps @ LPS_TO_RAS.T


def save(datasets: list[Dataset], folder, seed: int = 1) -> None:
    """Write the slices in a shuffled order under names with and without .dcm."""
    folder.mkdir(exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(datasets))
    for n, k in enumerate(order):
        datasets[k].save_as(folder / (f"IM{n:04d}" if n % 2 else f"slice_{n}.dcm"), enforce_file_format=True)


def test_oblique_series_from_shuffled_files_has_the_known_volume_and_geometry(tmp_path):
    series = Series()
    folder = tmp_path / "ct"
    save(series.datasets(), folder)
    (folder / "README.txt").write_text("not DICOM\n")
    shutil.copy(get_testdata_file("DICOMDIR", download=False), folder / "DICOMDIR")     # an index, no image
    shutil.copy(get_testdata_file("rtstruct.dcm", download=False), folder / "rtstruct")  # DICOM, no image

    image = sf.read(folder)
    assert image.shape == (COLUMNS, ROWS, SLICES) and image.data.shape == (1, COLUMNS, ROWS, SLICES)
    assert image.source == str(folder)
    np.testing.assert_array_equal(image.data[0].numpy(), series.values.astype(np.float32))   # rescaled per slice
    np.testing.assert_allclose(image.spacing.numpy(), [PIXEL_SPACING[1], PIXEL_SPACING[0], GAP], atol=1e-4)
    np.testing.assert_allclose(image.origin.numpy(), LPS_TO_RAS @ series.positions[0], atol=1e-9)
    expected_direction = LPS_TO_RAS @ np.stack([series.row, series.column, series.normal], axis=1)
    np.testing.assert_allclose(image.direction.numpy(), expected_direction, atol=1e-6)

    world = series.world()
    np.testing.assert_allclose(Grid.of(image).points(torch.float64).numpy(), world, atol=1e-4)
    index = torch.tensor([3.0, 4.0, 5.0, 1.0], dtype=torch.float64)
    np.testing.assert_allclose((image.index_to_world @ index)[:3].numpy(), world[3, 4, 5], atol=1e-4)


def test_series_stored_against_the_normal_is_sorted_and_keeps_its_world_geometry(tmp_path):
    series = Series(step_sign=-1.0)          # slice k of the known volume lies k * GAP *below* slice 0
    save(series.datasets(), tmp_path / "reversed")

    image = sf.read(tmp_path / "reversed")
    np.testing.assert_array_equal(image.data[0].numpy(), series.values[:, :, ::-1].astype(np.float32))
    np.testing.assert_allclose(Grid.of(image).points(torch.float64).numpy(), series.world()[:, :, ::-1], atol=1e-4)
    np.testing.assert_allclose(image.origin.numpy(), LPS_TO_RAS @ series.positions[-1], atol=1e-9)
    np.testing.assert_allclose(image.direction[:, 2].numpy(), LPS_TO_RAS @ series.normal, atol=1e-6)
    assert image.spacing[2].item() == pytest.approx(GAP, abs=1e-4)


def test_series_reads_as_simpleitk_reads_it(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    series = Series(step_sign=-1.0)
    save(series.datasets(), tmp_path / "synthetic")
    folders = [tmp_path / "synthetic"]
    installed = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    if installed.is_dir():                                      # 5 real CT slices stored in reverse order
        folders.append(installed)
    for folder in folders:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        reader.SetOutputPixelType(sitk.sitkFloat32)
        sitk.WriteImage(reader.Execute(), str(tmp_path / "itk.mha"))
        ours, theirs = sf.read(folder), sf.read(tmp_path / "itk.mha")
        assert ours.shape == theirs.shape, folder
        np.testing.assert_allclose(ours.data.numpy(), theirs.data.numpy(), atol=1e-3)
        np.testing.assert_allclose(ours.spacing.numpy(), theirs.spacing.numpy(), atol=1e-4)
        np.testing.assert_allclose(ours.origin.numpy(), theirs.origin.numpy(), atol=1e-4)
        np.testing.assert_allclose(ours.direction.numpy(), theirs.direction.numpy(), atol=1e-5)


def test_gaps_within_one_percent_are_accepted(tmp_path):
    series = Series()
    datasets = series.datasets()
    datasets[2].ImagePositionPatient = [float(v) for v in series.positions[2] + 0.004 * GAP * series.normal]
    save(datasets, tmp_path / "jittered")
    image = sf.read(tmp_path / "jittered")
    assert image.shape == (COLUMNS, ROWS, SLICES) and image.spacing[2].item() == pytest.approx(GAP, abs=1e-4)


def test_a_single_slice_folder_is_a_volume_one_slice_thick(tmp_path):
    series = Series()
    save([series.dataset(2)], tmp_path / "one")
    image = sf.read(tmp_path / "one")
    assert image.shape == (COLUMNS, ROWS, 1) and image.spacing[2].item() == 9.0      # SliceThickness, for want of a gap
    np.testing.assert_allclose(image.origin.numpy(), LPS_TO_RAS @ series.positions[2], atol=1e-9)


def _two_series(datasets):
    other = generate_uid()
    for ds in datasets[4:]:
        ds.SeriesInstanceUID = other
    return datasets


def _tilted(datasets):
    datasets[3].ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    return datasets


def _resized(datasets):
    datasets[2].Rows, datasets[2].Columns = 3, 4
    datasets[2].PixelData = np.zeros((3, 4), "<i2").tobytes()
    return datasets


def _duplicated(datasets):
    datasets[4].ImagePositionPatient = list(datasets[3].ImagePositionPatient)
    return datasets


def _unpositioned(datasets):
    del datasets[1].ImagePositionPatient
    return datasets


BAD_SERIES = {
    "several series": (_two_series, r"holds 2 DICOM series; choose one with series=UID: .* \([24] files\), .* \([24] files\)$"),
    "inconsistent orientation": (_tilted, r"slices have different ImageOrientationPatient: .* in .*, .* in "),
    "inconsistent rows and columns": (_resized, r"slices differ in size: (5x7|3x4) \(rows x columns\) in .*, (3x4|5x7) in "),
    "duplicate positions": (_duplicated, r"2 slices share a position, e.g. "),
    "a missing slice": (lambda d: d[:2] + d[3:], r"slice spacing is not uniform: gaps from 2.5 to 5 mm"),
    "no ImagePositionPatient": (_unpositioned, r"\S+ has no ImagePositionPatient; cannot place it in the volume$"),
    "no DICOM file": (lambda d: [], r"no DICOM images in this folder"),
}


@pytest.mark.parametrize("case", BAD_SERIES, ids=list(BAD_SERIES))
def test_a_bad_series_gives_one_line_naming_the_folder(tmp_path, case):
    spoil, message = BAD_SERIES[case]
    folder = tmp_path / "series"
    save(spoil(Series().datasets()), folder)
    (folder / "notes.txt").write_text("a readme\n")
    with pytest.raises(sf.ShapeflowError, match=re.escape(str(folder)) + ": " + message) as error:
        sf.read(folder)
    assert "\n" not in str(error.value)


def test_series_keyword_picks_one_of_several_series(tmp_path):
    series = Series()
    datasets = _two_series(series.datasets())
    save(datasets, tmp_path / "two")
    image = sf.read(tmp_path / "two", series=datasets[5].SeriesInstanceUID)
    np.testing.assert_array_equal(image.data[0].numpy(), series.values[:, :, 4:].astype(np.float32))
    np.testing.assert_allclose(image.origin.numpy(), LPS_TO_RAS @ series.positions[4], atol=1e-9)
    assert sf.read(tmp_path / "two", series=series.uid).shape == (COLUMNS, ROWS, 4)
    with pytest.raises(sf.ShapeflowError, match=r"two: no DICOM series 1\.2\.3; found "):
        sf.read(tmp_path / "two", series="1.2.3")
    with pytest.raises(sf.ShapeflowError, match="is not a folder"):
        sf.read(get_testdata_file("CT_small.dcm", download=False), series=series.uid)
    with pytest.raises(sf.ShapeflowError, match="a folder is read as a DICOM series"):
        sf.read(tmp_path / "two", kind="points")


def enhanced_multiframe(series: Series, frame_order: np.ndarray) -> Dataset:
    """The known volume as one enhanced MR file: frame f holds slice frame_order[f], placed by a
    per-frame PlanePositionSequence and rescaled by a per-frame PixelValueTransformationSequence;
    orientation and PixelSpacing are shared."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = EnhancedMRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality = series.uid, generate_uid(), "MR"
    ds.Rows, ds.Columns, ds.NumberOfFrames = ROWS, COLUMNS, SLICES
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = [float(v) for v in (*series.row, *series.column)]
    measures.PixelSpacing, measures.SliceThickness = list(PIXEL_SPACING), 9.0
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([orientation]), Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in frame_order:
        group, position, rescale = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [float(v) for v in series.positions[k]]
        rescale.RescaleSlope, rescale.RescaleIntercept = float(series.slopes[k]), float(series.intercepts[k])
        rescale.RescaleType = "US"
        group.PlanePositionSequence, group.PixelValueTransformationSequence = Sequence([position]), Sequence([rescale])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.ascontiguousarray(series.raw[:, :, frame_order].transpose(2, 1, 0)).astype("<i2").tobytes()
    return ds


def test_enhanced_multiframe_file_is_placed_by_its_per_frame_positions(tmp_path):
    series = Series(step_sign=-1.0)
    frame_order = np.array([3, 0, 5, 1, 4, 2])
    path = tmp_path / "enhanced.dcm"
    enhanced_multiframe(series, frame_order).save_as(path, enforce_file_format=True)

    image = sf.read(path)
    np.testing.assert_array_equal(image.data[0].numpy(), series.values[:, :, ::-1].astype(np.float32))
    np.testing.assert_allclose(Grid.of(image).points(torch.float64).numpy(), series.world()[:, :, ::-1], atol=1e-4)
    assert image.spacing.tolist() == pytest.approx([PIXEL_SPACING[1], PIXEL_SPACING[0], GAP], abs=1e-4)
    # against pydicom's own pixel_array: frame f rescaled is slice frame_order[f]
    pixels = pydicom.dcmread(path).pixel_array
    for f, k in enumerate(frame_order):
        expected = pixels[f].T * series.slopes[k] + series.intercepts[k]
        np.testing.assert_array_equal(image.data[0, :, :, SLICES - 1 - k].numpy(), expected.astype(np.float32))
    # a folder holding just this file reads the same
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(path, folder / "frames")
    assert torch.equal(sf.read(folder).data, image.data)


def test_multiframe_without_a_position_for_every_frame_is_refused(tmp_path):
    ds = enhanced_multiframe(Series(), np.arange(SLICES))
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    ds.save_as(tmp_path / "partial.dcm", enforce_file_format=True)
    with pytest.raises(sf.ShapeflowError, match=r"partial.dcm: multi-frame DICOM without a PlanePositionSequence"):
        sf.read(tmp_path / "partial.dcm")


def test_multiframe_rt_dose_from_pydicom_matches_its_pixel_array():
    # pydicom's enhanced MR test file (emri_small.dcm) is downloaded on demand, so it is not used;
    # rtdose.dcm is installed with pydicom: 15 frames placed by GridFrameOffsetVector
    dose_file = get_testdata_file("rtdose.dcm", download=False)
    raw = pydicom.dcmread(dose_file)
    dose = sf.read(dose_file)
    offsets = np.asarray(raw.GridFrameOffsetVector, dtype=float)
    assert np.all(np.diff(offsets) > 0)                                 # frames already ascending along the normal
    expected = np.moveaxis(raw.pixel_array, 0, -1).transpose(1, 0, 2) * float(raw.DoseGridScaling)
    np.testing.assert_allclose(dose.data[0].numpy(), expected.astype(np.float32), rtol=1e-6)
    assert dose.spacing.tolist() == pytest.approx([float(raw.PixelSpacing[1]), float(raw.PixelSpacing[0]), offsets[1]])
    np.testing.assert_allclose(dose.origin.numpy(), LPS_TO_RAS @ np.asarray(raw.ImagePositionPatient, dtype=float))
    np.testing.assert_allclose(dose.direction.numpy(), LPS_TO_RAS)


def _blob_series(folder, shift: float = 0.0) -> None:
    """A smooth blob in a 12 x 10 x 8 axial series (1.5 mm pixels, 2 mm slices)."""
    series = Series()
    x, y, z = np.meshgrid(np.arange(12), np.arange(10), np.arange(8), indexing="ij")
    blob = 1000 * np.exp(-((x - 5.5 - shift) ** 2 / 8 + (y - 4.5) ** 2 / 6 + (z - 3.5) ** 2 / 4))
    datasets = []
    for k in range(8):
        ds = series.dataset(0)
        ds.Rows, ds.Columns, ds.PixelSpacing = 10, 12, [1.5, 1.5]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [-8.0, -7.0, 2.0 * k]
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -100.0
        ds.PixelData = np.ascontiguousarray(blob[:, :, k].T).astype("<i2").tobytes()
        datasets.append(ds)
    save(datasets, folder)


def test_cli_registers_a_dicom_folder_onto_a_nifti_and_a_nifti_onto_a_dicom_folder(tmp_path):
    from shapeflow_cli.main import app

    _blob_series(tmp_path / "fixed_ct")
    _blob_series(tmp_path / "moving_ct", shift=1.0)
    sf.write(sf.read(tmp_path / "fixed_ct"), tmp_path / "fixed.nii.gz")
    runner = CliRunner()
    for moving, fixed, out in [(tmp_path / "moving_ct", tmp_path / "fixed.nii.gz", tmp_path / "a"),
                               (tmp_path / "fixed.nii.gz", tmp_path / "moving_ct", tmp_path / "b")]:
        run = runner.invoke(app, ["register", str(moving), str(fixed), "-o", str(out), "--iterations", "2",
                                  "--device", "cpu", "--quiet"])
        assert run.exit_code == 0, run.output
        assert {"warped.nii.gz", "deformation.pt", "report.json"} <= {p.name for p in out.iterdir()}
        warped, target = sf.read(out / "warped.nii.gz"), sf.read(fixed)
        assert warped.shape == target.shape
        np.testing.assert_allclose(warped.origin.numpy(), target.origin.numpy(), atol=1e-6)
