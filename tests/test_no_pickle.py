"""No deserialization that can run code anywhere in the project's own code (sockets included)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cluster", "router", "encoder_pool", "prefill_workers", "decode_workers", "models", "benchmarks")
UNSAFE = re.compile(r"pickle\.loads?\(|cloudpickle\.loads?\(|recv_pyobj|weights_only\s*=\s*False|"
                    r"torch\.load\((?![^)]*weights_only\s*=\s*True)|yaml\.load\((?![^)]*SafeLoader)|(?<![.\w])eval\(|(?<![.\w])exec\(")


def test_no_unsafe_deserialization_in_project_code():
    hits = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if UNSAFE.search(line.split("#", 1)[0]):
                    hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not hits, "unsafe deserialization:\n" + "\n".join(hits)


def test_the_scan_catches_what_it_looks_for():
    for bad in ("x = pickle.loads(data)", "torch.load(f)", "torch.load(f, weights_only=False)",
                "yaml.load(text)", "sock.recv_pyobj()", "eval(s)"):
        assert UNSAFE.search(bad), bad
    for fine in ("torch.load(f, weights_only=True)", "yaml.safe_load(text)", "msgpack.unpackb(b)", "model.eval()"):
        assert not UNSAFE.search(fine), fine
