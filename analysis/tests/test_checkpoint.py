"""moelab_analysis.checkpoint: moelab checkpoints (safetensors, format 2; and format 1) in numpy.

Files made by the C++ binary: the committed goldens of tests/golden/checkpoint (README there),
and, when a moelab binary is built (MOELAB_BIN, else build/moelab), a run made now plus a
round trip the other way (a checkpoint written here, read by `moelab generate`).
"""
import os
import shutil
import struct
import subprocess

import numpy as np
import pytest

from conftest import REPO

from moelab_analysis import checkpoint as ck
from moelab_analysis import synthetic

GOLDEN = REPO / "tests" / "golden" / "checkpoint"
TINY = GOLDEN / "tiny_run_step_000002.ckpt"


def moelab_bin():
    p = os.environ.get("MOELAB_BIN") or str(REPO / "build" / "moelab")
    return os.path.abspath(p) if os.access(p, os.X_OK) else None


def sample():
    """The content of `Sample` in tests/test_checkpoint.cpp (v1_sample.ckpt, v2_sample.ckpt)."""
    v = np.array([0.25 * i - 3.0 for i in range(32)])
    bias = v[:6].astype(np.float32).view(np.uint32) >> np.uint32(16)  # exact in bf16
    tensors = {
        "layer0.w1": v.astype(np.float32).reshape(4, 8),
        "embedding": v[:12].reshape(3, 4),
        "__blob__.rng": np.array([0x0123456789abcdef, 0, 2 ** 64 - 1, 42], dtype=np.uint64),
        "layer0.bias": bias.astype(np.uint16),
        "data.ids": np.array([[1, -2], [3, 2147483647]], dtype=np.int32),
    }
    return tensors, {"step": "20", "model": "layers=2 d_model=8"}


def test_loads_a_training_checkpoint_of_the_cpp_binary():
    tensors, meta = ck.load_checkpoint(TINY)
    assert meta["kind"] == "moelab-train-state-1" and meta["step"] == "2"
    assert "[model]" in meta["config"] and len(meta["run_id"]) == 32
    assert not any(k.startswith("checkpoint.") for k in meta)
    w1 = tensors["block0.moe.experts.w1"]
    assert w1.shape == (4, 8, 16) and w1.dtype == np.float32 and w1.flags.writeable
    assert tensors["block0.moe.experts.w2"].shape == (4, 8, 8)
    assert tensors["block0.moe.router.w"].shape == (8, 4)
    assert tensors["router_bias.0"].shape == (4,)
    assert tensors["__blob__.data_state"].dtype == np.uint64
    # Weights first, then their AdamW state, in the trainer's order.
    names = list(tensors)
    assert names[0] == "embed" and names[1] == "adam.m.embed" and names[2] == "adam.v.embed"
    assert all(np.isfinite(a).all() for k, a in tensors.items() if not k.startswith("__blob__"))
    # Loading a subset still verifies everything.
    sub, _ = ck.load_checkpoint(TINY, names=["block0.moe.router.w"])
    assert list(sub) == ["block0.moe.router.w"]
    np.testing.assert_array_equal(sub["block0.moe.router.w"], tensors["block0.moe.router.w"])
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        ck.load_checkpoint(TINY, names=["nope"])


def test_format_1_and_format_2_goldens_hold_the_same_bits():
    t1, m1 = ck.load_checkpoint(GOLDEN / "v1_roundtrip.ckpt")
    t2, m2 = ck.load_checkpoint(GOLDEN / "v2_roundtrip.ckpt")
    assert list(t1) == list(t2) == ["layer0.w1", "layer0.w2", "norm.bf16", "data.ids", "empty",
                                    "__blob__.rng", "__blob__.no_words"]
    for k in t1:
        assert t1[k].dtype == t2[k].dtype and t1[k].shape == t2[k].shape
        assert t1[k].tobytes() == t2[k].tobytes(), k
    assert m1 == m2 and m2["binary"] == "a\x00b\n\udcff"      # not UTF-8: surrogateescape
    # Bit patterns survive: NaN payload, -0, denormals; bf16 widened exactly to float32.
    assert t2["layer0.w1"].view(np.uint64)[0, 0] == 0x7ff8dead0000beef
    assert t2["layer0.w2"].view(np.uint32).ravel()[7] == 0xdeadbeef
    assert list(t2["norm.bf16"].view(np.uint32)) == [0x7fc10000, 0x80000000, 0x00010000, 0x3f800000]
    assert t2["norm.bf16"].dtype == np.float32 and t2["norm.bf16"][3] == 1.0
    assert t2["empty"].shape == (0, 5)
    assert list(t2["__blob__.rng"]) == [2 ** 64 - 1, 0, 0x8000000000000001]


def test_load_then_write_is_byte_identical_with_raw_bf16(tmp_path):
    for src in ["v1_roundtrip.ckpt", "v2_roundtrip.ckpt"]:
        tensors, meta = ck.load_checkpoint(GOLDEN / src, raw_bf16=True)
        assert tensors["norm.bf16"].dtype == np.uint16
        out = ck.write_checkpoint(tmp_path / src, tensors, meta, bf16=["norm.bf16"])
        assert out.read_bytes() == (GOLDEN / "v2_roundtrip.ckpt").read_bytes(), src


def test_python_writer_reproduces_the_cpp_writer_byte_for_byte(tmp_path):
    tensors, meta = sample()
    out = ck.write_checkpoint(tmp_path / "step_000020.ckpt", tensors, meta, bf16=["layer0.bias"])
    assert out.read_bytes() == (GOLDEN / "v2_sample.ckpt").read_bytes()
    back, m = ck.load_checkpoint(out)
    assert m == meta
    np.testing.assert_array_equal(back["layer0.w1"], tensors["layer0.w1"])
    np.testing.assert_array_equal(back["layer0.bias"], np.array([0.25 * i - 3 for i in range(6)], np.float32))


def test_meta_that_contains_the_format_keys_as_text(tmp_path):
    meta = {'a"checkpoint.header_sha256': '"checkpoint.file_size":"00000000000000000001"',
            "z": ',"checkpoint.header_sha256":"' + "0" * 64 + '"', "bin": "\udcff\x00"}
    p = ck.write_checkpoint(tmp_path / "step_000001.ckpt", {"w": np.ones(3, np.float32)}, meta)
    assert ck.load_checkpoint(p)[1] == meta


def test_header_checksum_file_size_and_layout(tmp_path):
    header, meta = ck.read_header(TINY)
    n = struct.unpack("<Q", TINY.read_bytes()[:8])[0]
    assert int(meta["checkpoint.file_size"]) == TINY.stat().st_size == 8 + n + max(
        t["data_offsets"][1] for t in header.values())
    assert meta["checkpoint.format"] == "moelab" and meta["checkpoint.version"] == "2"
    # Any standard reader sees the blob as a U64 tensor.
    assert header["__blob__.data_state"]["dtype"] == "U64"


@pytest.fixture()
def damaged(tmp_path):
    good = TINY.read_bytes()
    target = tmp_path / "step_000002.ckpt"

    def make(data):
        target.write_bytes(bytes(data))
        return target
    return good, make


def test_damage_is_refused_naming_the_file_and_tensor(damaged):
    good, make = damaged
    header, _ = ck.read_header(TINY)
    data_start = 8 + struct.unpack("<Q", good[:8])[0]
    at = data_start + header["block0.moe.experts.w1"]["data_offsets"][0] + 100
    flipped = bytearray(good)
    flipped[at] ^= 0x01
    p = make(flipped)
    with pytest.raises(ck.CheckpointError, match=r"checksum mismatch in tensor 'block0.moe.experts.w1'") as e:
        ck.load_checkpoint(p)
    assert str(p) in str(e.value)
    ck.load_checkpoint(p, verify=False)       # the checksums are what caught it

    blob = data_start + header["__blob__.data_state"]["data_offsets"][0]
    flipped = bytearray(good)
    flipped[blob] ^= 0x80
    with pytest.raises(ck.CheckpointError, match="checksum mismatch in blob 'data_state'"):
        ck.load_checkpoint(make(flipped))

    flipped = bytearray(good)
    flipped[good.index(b"d_model = 8")] ^= 0x01           # the config, inside the header
    with pytest.raises(ck.CheckpointError, match="checksum mismatch in the header"):
        ck.load_checkpoint(make(flipped))

    with pytest.raises(ck.CheckpointError, match=r"is truncated \(expected {} bytes, found {}\)".format(
            len(good), len(good) - 10)):
        ck.load_checkpoint(make(good[:-10]))
    with pytest.raises(ck.CheckpointError, match="is truncated"):
        ck.load_checkpoint(make(good[:100]))
    with pytest.raises(ck.CheckpointError, match="1 bytes of trailing garbage"):
        ck.load_checkpoint(make(good + b"\0"))
    with pytest.raises(ck.CheckpointError, match="is empty"):
        ck.load_checkpoint(make(b""))
    with pytest.raises(ck.CheckpointError, match="not a moelab checkpoint"):
        ck.load_checkpoint(make(b"\x89HDF\r\n\x1a\n" + bytes(100)))


def test_every_flipped_byte_of_a_small_checkpoint_is_caught(tmp_path):
    good = (GOLDEN / "v2_sample.ckpt").read_bytes()
    p = tmp_path / "x.ckpt"
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 0x01
        p.write_bytes(bytes(bad))
        with pytest.raises(ck.CheckpointError):
            ck.load_checkpoint(p)


def test_a_foreign_safetensors_file_is_not_a_checkpoint(tmp_path):
    import json
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(ck.CheckpointError, match=r"not a moelab checkpoint \(no checkpoint.header_sha256"):
        ck.load_checkpoint(p)


def test_format_1_damage_is_refused(tmp_path):
    good = (GOLDEN / "v1_sample.ckpt").read_bytes()
    p = tmp_path / "v1.ckpt"
    bad = bytearray(good)
    bad[good.index(b"layer0.w1") + 9 + 8 + 17] ^= 0x01
    p.write_bytes(bytes(bad))
    with pytest.raises(ck.CheckpointError, match="checksum mismatch in 'layer0.w1'"):
        ck.load_checkpoint(p)
    p.write_bytes(good[:-3])
    with pytest.raises(ck.CheckpointError, match="is truncated"):
        ck.load_checkpoint(p)


def test_expert_measures_by_hand():
    w = np.zeros((3, 2, 2))
    w[0] = [[1, 0], [0, 0]]
    w[1] = [[2, 0], [0, 0]]          # parallel to expert 0
    w[2] = [[0, 1], [0, 0]]          # orthogonal to both
    sim = ck.expert_cosine_similarity(w)
    np.testing.assert_allclose(sim, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    assert ck.mean_off_diagonal(sim) == pytest.approx(2 / 6)
    tensors = {"block3.moe.router.w": np.array([[3.0, 0.0], [4.0, 1.0]]),
               "block3.moe.experts.w1": np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4),
               "block3.moe.experts.w2": np.zeros((2, 2, 3), np.float32), "block1.wq": np.zeros(1)}
    np.testing.assert_allclose(ck.router_weight_norms(tensors, 3), [5.0, 1.0])
    assert ck.moe_blocks(tensors) == [3]
    m = ck.expert_matrices(tensors, 3)
    np.testing.assert_array_equal(m["w1"], tensors["block3.moe.experts.w1"][..., :2])   # gate
    np.testing.assert_array_equal(m["w3"], tensors["block3.moe.experts.w1"][..., 2:])   # up
    assert m["w2"].shape == (2, 2, 3)


def test_trajectory_over_synthetic_checkpoints(tmp_path):
    paths = synthetic.write_synthetic_checkpoints(tmp_path / "ck", steps=(0, 10, 30), blocks=2, experts=4)
    found = ck.list_checkpoints(tmp_path / "ck")
    assert [s for s, _ in found] == [0, 10, 30] and [p for _, p in found] == paths
    tr = ck.expert_weight_trajectory(found)
    assert list(tr["steps"]) == [0, 10, 30] and tr["blocks"] == [0, 1]
    b0 = tr[0]
    assert b0["similarity"]["w1"].shape == (3, 4, 4) and b0["router_norm"].shape == (3, 4)
    np.testing.assert_allclose(np.diagonal(b0["similarity"]["w2"], axis1=1, axis2=2), 1.0, rtol=1e-12)
    # The synthetic story: similarity rises, router columns grow.
    assert b0["mean_similarity"]["w1"][-1] > b0["mean_similarity"]["w1"][0] + 0.2
    assert (b0["router_norm"][-1] > b0["router_norm"][0]).all()
    with pytest.raises(ck.CheckpointError):
        (tmp_path / "ck" / "step_000040.ckpt").write_bytes(b"MOELABCK")
        ck.expert_weight_trajectory(ck.list_checkpoints(tmp_path / "ck"))


@pytest.mark.skipif(moelab_bin() is None, reason="no moelab binary (MOELAB_BIN or build/moelab)")
def test_a_run_of_the_binary_now_and_a_python_written_checkpoint_in_the_binary(tmp_path):
    ini = (GOLDEN / "README.md").read_text().split("```")[1]
    (tmp_path / "tiny.ini").write_text(ini)
    subprocess.run([moelab_bin(), "train", "--config", "tiny.ini", "--out", "run.h5", "--set",
                    "log.checkpoint_dir=ck", "--set", "log.checkpoint_every=1"], cwd=tmp_path, check=True,
                   capture_output=True)
    found = ck.list_checkpoints(tmp_path / "ck")
    assert [s for s, _ in found] == [1, 2]
    tensors, meta = ck.load_checkpoint(found[-1][1])
    assert meta["step"] == "2"
    # The config of the golden file: the same expert and router tensors (not compared by value:
    # the golden must not break when the model's numerics change).
    golden, _ = ck.load_checkpoint(TINY)
    for k in ["block0.moe.experts.w1", "block0.moe.experts.w2", "block0.moe.router.w", "router_bias.0"]:
        assert tensors[k].shape == golden[k].shape and tensors[k].dtype == golden[k].dtype, k
    # Written by Python, read by moelab: generation from it equals generation from the original.
    copy = ck.write_checkpoint(tmp_path / "py" / "step_000002.ckpt", tensors, meta)

    def generate(path):
        return subprocess.run([moelab_bin(), "generate", "--checkpoint", str(path), "--tokens", "40"],
                              cwd=tmp_path, check=True, capture_output=True).stdout
    assert generate(copy) == generate(found[-1][1])
    assert copy.read_bytes() == found[-1][1].read_bytes()    # byte for byte the C++ writer's
