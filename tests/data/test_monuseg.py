
import cv2
import numpy as np
import pytest

from tests.helpers import SHARED_DATA, XML, region, write_pair
from xsight_keras.data import (
    PreparedDataset,
    find_monuseg_pairs,
    prepare_monuseg,
    read_aperio_polygons,
    read_monuseg_sample,
)

SAMPLE = SHARED_DATA / "monuseg-sample"


def test_polygons_fill_instances_later_ones_win_and_are_clipped(tmp_path):
    regions = [
        region(1, [(2, 2), (12, 2), (12, 12), (2, 12)]),
        region(2, [(10.4, 10.4), (20, 10.4), (20, 20), (10.4, 20)]),  # overlaps the first
        region(3, [(-2.9, 30), (8, 30), (8, 45.7), (-2.9, 45.7)]),     # runs outside the image
    ]
    image = write_pair(tmp_path, "a", regions)
    got_image, instances = read_monuseg_sample(tmp_path / "a.tif", tmp_path / "a.xml")
    np.testing.assert_array_equal(got_image, image[..., ::-1])  # written BGR, read RGB
    assert instances.dtype == np.int32 and instances.shape == (40, 50)
    assert instances[5, 5] == 1 and instances[11, 11] == 2 and instances[15, 15] == 2
    assert instances[35, 0] == 3 and instances[39, 8] == 3  # clipped to the last row/column
    assert sorted(np.unique(instances)) == [0, 1, 2, 3]


def test_bad_annotations_are_clear_errors(tmp_path):
    (tmp_path / "broken.xml").write_text("<Annotations><Region>")
    with pytest.raises(ValueError, match="broken.xml: malformed XML"):
        read_aperio_polygons(tmp_path / "broken.xml")
    (tmp_path / "few.xml").write_text(XML.format(
        regions=region(7, [(1, 1), (2, 2)]) + region(8, [(1, 1), (5, 1), (5, 5)])))
    with pytest.warns(UserWarning, match=r"few.xml: left out 1 region\(s\) .*Id=7 \(2 vertices\)"):
        polygons = read_aperio_polygons(tmp_path / "few.xml")  # as in two real MoNuSeg files
    assert len(polygons) == 1 and polygons[0].shape == (3, 2)
    (tmp_path / "nan.xml").write_text(XML.format(
        regions='<Region Id="4"><Vertices><Vertex X="1"/><Vertex X="2" Y="3"/><Vertex X="4" Y="1"/></Vertices></Region>'))
    with pytest.raises(ValueError, match="nan.xml: region Id=4 has a vertex without numeric"):
        read_aperio_polygons(tmp_path / "nan.xml")
    write_pair(tmp_path / "set", "ok", [region(1, [(1, 1), (5, 1), (5, 5)])])
    cv2.imwrite(str(tmp_path / "set" / "lonely.tif"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="lonely.tif"):
        find_monuseg_pairs(tmp_path / "set")
    (tmp_path / "set" / "lonely.xml").write_text(XML.format(regions=""))
    (tmp_path / "set" / "lonely.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ValueError, match="lonely.tif: cannot be decoded"):
        prepare_monuseg(tmp_path / "set", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_training_release_layout_is_paired_by_name(tmp_path):
    root = tmp_path / "MoNuSeg 2018 Training Data"
    write_pair(root / "Tissue Images", "TCGA-1", [region(1, [(1, 1), (9, 1), (9, 9)])])
    (root / "Annotations").mkdir()
    (root / "Tissue Images" / "TCGA-1.xml").rename(root / "Annotations" / "TCGA-1.xml")
    prepare_monuseg(root, tmp_path / "prepared", progress=False)
    ds = PreparedDataset(tmp_path / "prepared")
    assert ds.names == ["TCGA-1"] and ds.instance_counts.tolist() == [0, 1]
    assert set(np.unique(ds[0].classes)) == {0, 1}


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared MoNuSeg sample not present")
def test_real_monuseg_files(tmp_path):
    expected = {"TCGA-A7-A13E-01Z-00-DX1": 314, "TCGA-B0-5710-01Z-00-DX1": 359,
                "TCGA-CH-5767-01Z-00-DX1": 294, "TCGA-NH-A8F7-01A-01-TS1": 363}
    pairs = find_monuseg_pairs(SAMPLE)
    assert [p.stem for p, _ in pairs] == sorted(expected)
    for image_path, xml_path in pairs[:2]:
        assert len(read_aperio_polygons(xml_path)) == expected[image_path.stem]
    prepare_monuseg(SAMPLE, tmp_path / "train", progress=False)
    ds = PreparedDataset(tmp_path / "train")
    assert ds.arrays["images"].shape == (4, 1000, 1000, 3)
    assert [int(ds[i].instances.max()) for i in range(4)] == [expected[n] for n in ds.names]
    assert 0.1 < ds.pixel_counts[1] / ds.pixel_counts.sum() < 0.5  # nuclei cover a plausible share


def test_validation_fraction_splits_images_by_seed(tmp_path):
    for stem in ("a", "b", "c", "d", "e"):
        write_pair(tmp_path / "src", stem, [region(1, [(1, 1), (9, 1), (9, 9)])])
    written = prepare_monuseg(tmp_path / "src", tmp_path / "out", progress=False, val_fraction=0.4, seed=1)
    assert [p.name for p in written] == ["train", "valid"]
    train, valid = PreparedDataset(written[0]), PreparedDataset(written[1])
    assert len(valid) == 2 and len(train) == 3
    assert sorted(train.names + valid.names) == ["a", "b", "c", "d", "e"]
    again = prepare_monuseg(tmp_path / "src", tmp_path / "again", progress=False, val_fraction=0.4, seed=1)
    assert PreparedDataset(again[1]).names == valid.names


def test_an_annotation_without_regions_is_an_image_without_nuclei(tmp_path):
    write_pair(tmp_path / "src", "a", [region(1, [(2, 2), (12, 2), (12, 12)])])
    write_pair(tmp_path / "src", "b", [])  # <Regions> empty: valid, no nuclei
    (tmp_path / "src" / "c.xml").write_text('<?xml version="1.0"?><Annotations/>')
    write_pair(tmp_path / "tmp", "c", [])
    (tmp_path / "tmp" / "c.tif").rename(tmp_path / "src" / "c.tif")
    prepare_monuseg(tmp_path / "src", tmp_path / "out", progress=False)
    ds = PreparedDataset(tmp_path / "out")
    counts = {ds.meta["names"][i]: int(ds[i].instances.max()) for i in range(len(ds))}
    assert counts == {"a": 1, "b": 0, "c": 0}
