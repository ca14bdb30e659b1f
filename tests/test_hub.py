"""Model directories on the Hugging Face Hub: loading by repository id from the library's offline
cache (HF_HUB_OFFLINE=1, a cache folder laid out as huggingface_hub lays it out), pushing through a
mocked upload, the model card, and the class check of from_pretrained. Nothing here touches a network."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ddlp import Config
from ddlp.storage import model_card, model_directory
from ddlp.model import DDLP, DLP, ParticleModel, build_model

TINY = dict(enc_channels=[8, 16, 16], prior_channels=[8, 8, 16], n_kp_enc=3, n_kp_prior=6, learned_feature_dim=2,
            pint_dim=16, pint_heads=2, pint_layers=1, timestep_horizon=4)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(Config.preset("balls_small", **TINY))


def hub_cache(root, repo_id: str, model) -> str:
    """A huggingface_hub cache holding `model` as the main revision of `repo_id`."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    model.save_pretrained(repo / "snapshots" / COMMIT)
    return str(root)


def run_offline(cache: str, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": cache, "HF_HOME": cache}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_from_pretrained_by_hub_id_from_the_offline_cache(tiny, tmp_path):
    cache = hub_cache(tmp_path / "hub", "someone/ddlp-tiny", tiny)
    checksum = float(sum(p.double().sum() for p in tiny.state_dict().values()))
    done = run_offline(cache, "from ddlp.model import DDLP\n"
                              "m = DDLP.from_pretrained('someone/ddlp-tiny')\n"
                              "print(type(m).__name__, repr(float(sum(p.double().sum() for p in m.state_dict().values()))))")
    assert done.returncode == 0, done.stderr
    name, value = done.stdout.split()
    assert name == "DDLP" and float(value) == checksum
    info = run_offline(cache, "from ddlp.cli import main; main(['info', '--model-dir', 'someone/ddlp-tiny'])")
    assert info.returncode == 0 and "DDLP: " in info.stdout and "3 particles" in info.stdout, info.stderr
    missing = run_offline(cache, "from ddlp.model import DDLP; DDLP.from_pretrained('someone/not-cached')")
    assert missing.returncode != 0
    assert "someone/not-cached is neither a local folder nor a Hub model available here" in missing.stderr


def test_local_paths_never_reach_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)          # any import would fail
    assert model_directory("runs/typo") == tmp_path.joinpath("runs/typo").relative_to(tmp_path)
    assert str(model_directory("/abs/not/there")) == "/abs/not/there"
    with pytest.raises(ImportError, match=r"org/model is not a local folder; .*pip install 'ddlp\[hub\]'"):
        model_directory("org/model")


def test_push_to_hub_uploads_weights_config_and_card(tiny, monkeypatch):
    import huggingface_hub
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls["files"] = {p: open(os.path.join(folder_path, p), "rb").read() for p in os.listdir(folder_path)}
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/{COMMIT}"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = tiny.push_to_hub("me/ddlp-tiny", metrics={"med10": 0.5661}, private=True, token="t0k")
    assert url.endswith(f"me/ddlp-tiny/commit/{COMMIT}")
    assert calls["create"] == ("me/ddlp-tiny", True, True) and calls["token"] == "t0k"
    assert sorted(calls["files"]) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads(calls["files"]["config.json"])["pint_dim"] == 16
    assert "| med10 | 0.5661 |" in calls["files"]["README.md"].decode()


def test_model_card_and_class_check(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m", metrics={"med10": 0.61234, "episodes": 128})
    card = (tmp_path / "m" / "README.md").read_text()
    n = sum(p.numel() for p in tiny.state_dict().values())
    for line in ("library_name: ddlp", "| model | DDLP (video, PINT dynamics) |", "| particles | 3 (from 6 proposals)",
                 f"| parameters | {n:,} |", "| PINT | 1 layers, 2 heads, dim 16, 4-frame context |",
                 "| med10 | 0.6123 |", "| episodes | 128 |", 'model = DDLP.from_pretrained("'):
        assert line in card, line
    assert "## Evaluation" not in model_card(tiny.config, n)
    assert isinstance(ParticleModel.from_pretrained(tmp_path / "m"), DDLP)
    assert isinstance(DDLP.from_pretrained(tmp_path / "m"), DDLP)
    with pytest.raises(TypeError, match="holds a DDLP model, not a DLP"):
        DLP.from_pretrained(tmp_path / "m")
