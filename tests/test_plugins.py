"""Third-party backends and passes join through entry points, exactly like the built-in ones."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest

from sparsecc import backends, cli, passes

BACKEND = '''
from sparsecc.backends.base import Backend


class EchoBackend(Backend):
    """Writes one artifact naming every node it would run; declines Softmax."""

    name = "echo"
    description = "test backend: lists nodes"

    def declines(self, model):
        return {n.name: "Softmax is not supported by echo" for n in model.graph if n.op_type == "Softmax"}

    def lower(self, model, out_dir):
        (out_dir / "echo.txt").write_text("\\n".join(n.op_type for n in model.graph))
        return {"files": ["echo.txt"], "nodes": len(model.graph)}
'''

PASS = '''
import dataclasses
from sparsecc.config import option
from sparsecc.pass_manager import Pass, PassResult


@dataclasses.dataclass(frozen=True)
class TagConfig:
    text: str = option("hello", "text to store in the model's metadata")


class Tag(Pass):
    """Store a text in the model's metadata."""

    name = "tag"
    Config = TagConfig

    def run(self, model, ctx):
        model.metadata_props["tag"] = self.config.text
        return PassResult({}, changed=True)
'''


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    """An installed-looking distribution: a module plus a .dist-info with entry points."""
    (tmp_path / "echo_sparsecc.py").write_text(BACKEND + PASS)
    info = tmp_path / "echo_sparsecc-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-sparsecc\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [sparsecc.backends]
        echo = echo_sparsecc:EchoBackend

        [sparsecc.passes]
        tag = echo_sparsecc:Tag
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("echo_sparsecc", None)


def test_builtin_ort_is_an_entry_point():
    assert backends.registry()["ort"].__module__ == "sparsecc.backends.ort"


def test_third_party_backend_and_pass(plugin_package, mlp_path, mlp_npz, tmp_path, capsys):
    assert set(backends.registry()) >= {"ort", "echo"}
    assert "tag" in passes.registry()
    assert cli.main(["list", "backends"]) == 0
    assert "echo" in capsys.readouterr().out
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("passes:\n- discover-sites\n- pass: tag\n  text: from-yaml\n")
    out = tmp_path / "out"
    rc = cli.main(["compile", str(mlp_path), "--pipeline", str(pipeline), "--target", "echo", "-o", str(out), "--no-cache"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["target"]["backend"] == "echo"
    assert report["target"]["artifacts"]["nodes"] == len((out / "echo.txt").read_text().splitlines())
    assert report["passes"][1] == {"id": "tag", "pass": "tag", "config": {"text": "from-yaml"}, "changed": True, "details": {}}
    assert "echo.txt" in report["outputs"]
