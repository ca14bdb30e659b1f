"""The `ddlp` command line."""
import subprocess
import sys

from PIL import Image

from ddlp.cli import main


def test_demo_writes_a_particle_picture(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--frames", "3"]) == 0
    img = Image.open(out)
    assert img.width > 3 * 256 and img.height > 2 * 256        # 3 frames x 2 rows at 4x zoom
    assert "encoded 3 frames" in capsys.readouterr().out


def test_demo_from_a_saved_model(tmp_path):
    from ddlp import Config, build_model
    build_model(Config.preset("shapes")).save_pretrained(tmp_path / "m")
    assert main(["demo", "--model-dir", str(tmp_path / "m"), "--out", str(tmp_path / "d.png"), "--frames", "2"]) == 0
    assert (tmp_path / "d.png").is_file()


def test_info_and_help(capsys):
    assert main(["info", "--preset", "balls"]) == 0
    assert "9,652,801 parameters" in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-m", "ddlp.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "convert" in r.stdout and "demo" in r.stdout


def test_bad_model_dir_is_one_clear_line(tmp_path, capsys):
    assert main(["demo", "--model-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddlp demo: error:") and "Traceback" not in err
