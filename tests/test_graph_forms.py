"""compile_model and evaluate take the graph forms users hold (a path, onnx.ModelProto,
onnx_ir.Model, onnx_graphsurgeon.Graph) and CompileResult.model_as hands each back: the
compiled model is the same whichever form went in, the caller's object is left as it was,
and every form handed back runs in ONNX Runtime to the same logits."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir
import onnxruntime as ort
import pytest

import sparsecc
from conftest import SAMPLE_MODEL, WIKITEXT, mlp_feeds, mlp_model
from sparsecc.errors import SparseccError

FORMS = {"path": lambda p: p, "onnx": lambda p: onnx.load(p), "ir": lambda p: ir.load(p),
         "graphsurgeon": lambda p: gs.import_onnx(onnx.load(p))}


def _proto(model: ir.Model) -> onnx.ModelProto:
    return ir.to_proto(model)


def _as_proto(model, form: str) -> onnx.ModelProto:
    """Independently of sparsecc.graph_forms: each library's own conversion."""
    if form == "onnx":
        return onnx.ModelProto.FromString(model.SerializeToString())
    return ir.to_proto(model) if form == "ir" else gs.export_onnx(model)


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlp") / "model.onnx"
    onnx.save(mlp_model(), path)
    return path


def _compile(model):
    return sparsecc.compile_model(model, sparsecc.default_pipeline(sparsity=0.5), mlp_feeds(4))


def test_every_form_in_compiles_to_the_same_model(mlp_file):
    reference = _proto(_compile(mlp_file).model)
    for form, make in FORMS.items():
        given = make(mlp_file)
        before = _as_proto(given, form) if form != "path" else None
        result = _compile(given)
        assert _proto(result.model) == reference, form   # every field equal
        assert result.report["source"]["model"] == (str(mlp_file.resolve()) if form == "path" else f"<{form} model in memory>")
        if form != "path":   # the caller's model is not changed by the passes
            assert _as_proto(given, form) == before, form


def test_every_form_out_runs_to_the_same_logits(mlp_file):
    result = _compile(mlp_file)
    feed = mlp_feeds(1)[0]
    expected = ort.InferenceSession(ir.to_proto(result.model).SerializeToString()).run(None, feed)[0]
    for form in ("onnx", "ir", "graphsurgeon"):
        handed = result.model_as(form)
        proto = _as_proto(handed, form)
        assert isinstance(handed, {"onnx": onnx.ModelProto, "ir": ir.Model, "graphsurgeon": gs.Graph}[form])
        out = ort.InferenceSession(proto.SerializeToString()).run(None, feed)[0]
        np.testing.assert_array_equal(out, expected)
    # a graphsurgeon round trip keeps the Threshold function: compile's output goes on through gs unchanged
    from sparsecc.graph_forms import to_ir

    back = to_ir(result.model_as("graphsurgeon"))
    assert [f.name for f in back.functions.values()] == [f.name for f in result.model.functions.values()]


def test_evaluate_takes_forms_too():
    data = sparsecc.data_source(str(WIKITEXT / "test.txt"), tokenizer=str(SAMPLE_MODEL.parent), windows=2, seq_len=32)
    by_path = sparsecc.evaluate(SAMPLE_MODEL, data)["result"]["perplexity"]
    for form in ("onnx", "ir", "graphsurgeon"):
        assert sparsecc.evaluate(FORMS[form](SAMPLE_MODEL), data)["result"]["perplexity"] == by_path, form


def test_other_objects_are_refused_in_one_line():
    with pytest.raises(SparseccError, match="cannot take a model of type dict; pass a path, an onnx.ModelProto"):
        _compile({"graph": 1})
    result = sparsecc.compile_model(SAMPLE_MODEL, [sparsecc.passes.get("insert-thresholds")()])
    with pytest.raises(SparseccError, match="unknown model form 'tf'"):
        result.model_as("tf")
