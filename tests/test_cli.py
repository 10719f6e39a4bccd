"""The CLI as a user runs it: a subprocess, real files, JSON on stdout."""

from __future__ import annotations

import json
import subprocess
import sys

from models.media_samples import make_test_audio, make_test_image
from tests.reference import HFReference


def tessera(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_make_tiny_model_then_generate_json_matches_transformers(tmp_path):
    model = tmp_path / "tiny"
    made = tessera("make-tiny-model", "--arch", "llava-clip-llama", str(model))
    assert made.returncode == 0, made.stderr
    assert (model / "config.json").exists() and (model / "model.safetensors").exists()

    image = tmp_path / "cat.png"
    image.write_bytes(make_test_image(3))
    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    out = tessera("generate", "--model", str(model), "--image", str(image), "--max-tokens", "12",
                  "--ignore-eos", "--json", prompt)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) >= {"text", "token_ids", "prompt_tokens", "finish_reason", "ttft_s", "tpot_s"}
    assert result["finish_reason"] == "length" and len(result["token_ids"]) == 12
    assert result["prompt_tokens"] > 256  # the placeholder expanded to the image's tokens

    from cluster.request_types import MediaInput

    expected = HFReference(model).greedy(prompt, [MediaInput(image.read_bytes(), "image/png")], 12)
    assert result["token_ids"] == expected


def test_generate_chat_audio_and_bad_input_exit_code(tmp_path, tiny_models):
    clip = tmp_path / "clip.wav"
    clip.write_bytes(make_test_audio(1, 1.5))
    out = tessera("generate", "--model", str(tiny_models["qwen2-audio"]), "--audio", str(clip), "--chat",
                  "--max-tokens", "5", "--json", "What do you hear?")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["token_ids"]) == 5

    bad = tessera("generate", "--model", str(tiny_models["qwen2-audio"]), "--audio", str(clip),
                  "--temperature", "-1", "Hi <|AUDIO|>")
    assert bad.returncode == 2 and "temperature" in bad.stderr and "Traceback" not in bad.stderr


def test_the_client_commands_import_neither_torch_nor_transformers(tmp_path):
    """``tessera status|scale|generate --server`` run in a process that never imports torch or
    transformers (seconds of start-up): a dead address is reported at once, with gRPC's status."""
    image = tmp_path / "a.png"
    image.write_bytes(make_test_image(0))
    script = (
        "import sys\n"
        "from cluster.cli import main\n"
        "codes = [main(args) for args in ([\"status\", \"--server\", \"127.0.0.1:1\"],\n"
        "         [\"scale\", \"--server\", \"127.0.0.1:1\", \"decode=2\"],\n"
        f"         [\"generate\", \"--server\", \"127.0.0.1:1\", \"--image\", {str(image)!r}, \"<image> hi\"])]\n"
        "heavy = sorted(m for m in (\"torch\", \"transformers\", \"numpy\", \"PIL\") if m in sys.modules)\n"
        "print(codes, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[1, 1, 1] []", out.stdout + out.stderr
    assert out.stderr.count("UNAVAILABLE") == 3
