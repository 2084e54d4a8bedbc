"""The built wheel, installed without extras, scores text and monitors generation."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import torch
import transformers as tf

from conftest import char_tokenizer, synthetic_bank, tiny_config
from emoscope.models import wrap_model

ROOT = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["nrclex"] = None  # the optional extra is not installed
    import emoscope as es
    from emoscope.errors import MissingPackageError

    assert es.__file__.startswith(sys.argv[1]), es.__file__  # the wheel, not the checkout
    lm = es.load_model(sys.argv[2])
    bank = es.EmotionBank.load(sys.argv[3], model=lm)
    monitor = es.Monitor(lm, bank)
    readout = monitor.score("the cat sat on the mat.")
    assert readout.z is not None and readout.z.shape[1] == len(bank.emotions)
    sampling = es.SamplingConfig(max_new_tokens=4, stop_at_eos=False)
    out = monitor.generate(["hello"], sampling=sampling, chat=False, alerts=["happy > 100"])
    assert len(out[0].token_ids) == 4 and out[0].concealment is None
    try:
        monitor.generate(["hello"], sampling=sampling, chat=False, expression=True)
    except MissingPackageError as exc:
        assert "emoscope[expression]" in str(exc), exc
    else:
        raise AssertionError("the expression readout ran without its extra")
    print("ok")
    """
)


def test_wheel_without_extras_scores_and_monitors(tmp_path, tiny_lm):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
        check=True,
    )
    (wheel,) = wheels.glob("emoscope-*.whl")
    metadata = subprocess.run(
        [sys.executable, "-m", "zipfile", "-l", str(wheel)], capture_output=True, text=True
    ).stdout
    assert "expression_coverage.json" in metadata and "emotions.json" in metadata

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    subprocess.run(
        [*PIP, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True,
    )
    # The core dependencies (torch, transformers, ...) come from this environment.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    lm = wrap_model(model, char_tokenizer(), str(tmp_path / "model"))
    synthetic_bank(lm).save(tmp_path / "bank")

    result = subprocess.run(
        [str(python), "-c", SCRIPT, str(site), str(tmp_path / "model"), str(tmp_path / "bank")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
