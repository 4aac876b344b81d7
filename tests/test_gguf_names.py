"""`--names hf` (issue 21 §1): a GGUF file's tensors read back under their Hugging Face names, Llama's
q/k projections un-permuted. Tiny seeded Llama, Qwen2 and Qwen3 models are written to GGUF as
llama.cpp's convert_hf_to_gguf.py writes them (names from gguf's TensorNameMap, Llama's q/k permuted
by LlamaModel.permute, F32, F16 and Q8_0 tensors), and what `convert --names hf` writes is held to
transformers' own GGUF loader (`load_gguf_checkpoint`) — names and values — and, for the F32
tensors, to the original model's state dict."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_one_error_line

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from gguf.quants import quantize  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

Q = gguf.GGMLQuantizationType
F16 = ("mlp.gate_proj", "mlp.down_proj", "self_attn.v_proj")  # written as F16 (the rest F32, but Q8_0)
Q8 = ("self_attn.q_proj", "mlp.up_proj")  # written as Q8_0: q_proj is un-permuted from dequantized rows


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_model(arch: str):
    torch.manual_seed({"llama": 1, "qwen2": 2, "qwen3": 3}[arch])
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=False,
                                                                       attention_bias=True))  # q/k biases permuted too
    elif arch == "qwen2":  # tied: no output.weight, no lm_head.weight
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=16, tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():  # norms too: not all ones
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def write_like_llama_cpp(model, path, arch: str, *, rope_freqs: bool = False, name: str = "tiny") -> dict:
    """The model as convert_hf_to_gguf.py writes it; returns {gguf name: GGML type name}."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_embedding_length(cfg.hidden_size)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    ids = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    names = gguf.get_tensor_name_map(ids[arch], cfg.num_hidden_layers)
    types = {}
    if rope_freqs:  # llama.cpp writes rope scaling factors as a tensor of its own: no HF name
        w.add_tensor("rope_freqs.weight", np.ones(head_dim // 2, np.float32))
        types["rope_freqs.weight"] = "F32"
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:  # tied: written once, as token_embd
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base) + "." + suffix
        data = t.detach().float().numpy()
        if arch == "llama" and base.endswith("q_proj"):
            data = permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        if arch == "llama" and base.endswith("k_proj"):
            data = permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        data = np.ascontiguousarray(data)
        if base.endswith(Q8):
            raw = quantize(data, Q.Q8_0)
            w.add_tensor(gguf_name, raw, raw_shape=raw.shape, raw_dtype=Q.Q8_0)
            types[gguf_name] = "Q8_0"
        elif base.endswith(F16):
            w.add_tensor(gguf_name, data.astype(np.float16))
            types[gguf_name] = "F16"
        else:
            w.add_tensor(gguf_name, data)
            types[gguf_name] = "F32"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def transformers_reads(path, model) -> dict:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def written(request, tmp_path_factory):
    arch = request.param
    model = tiny_model(arch)
    path = tmp_path_factory.mktemp(f"gguf-{arch}") / f"{arch}.gguf"
    types = write_like_llama_cpp(model, path, arch)
    return arch, model, path, types


def test_convert_names_hf_gives_what_transformers_loads(cli, written, tmp_path):
    arch, model, path, types = written
    out = tmp_path / "out.safetensors"
    result = cli("convert", path, "--names", "hf", "-o", out, "--json")
    assert result.code == 0, result.err
    got = load_file(str(out))
    want = transformers_reads(path, model)
    assert list(got) == list(want)  # the same names, in the file's order
    gguf_name = _hf_to_gguf(arch, model)
    for name, tensor in want.items():  # F16 kept as it lies (transformers widens it: the same values)
        assert got[name].dtype == (np.float16 if types[gguf_name[name]] == "F16" else np.float32), name
        assert np.array_equal(got[name].astype(np.float32), tensor.numpy()), name
    # the F32 tensors are the original model's, bit for bit (the permutation undone exactly)
    state = model.state_dict()
    f32 = [n for n in got if types[gguf_name[n]] == "F32"]
    assert f32 and all(torch.equal(torch.from_numpy(got[n]), state[n]) for n in f32)
    assert set(got) == set(state) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    report = json.loads(result.out)["hf_names"]
    assert report["architecture"] == arch and report["renamed"] == len(got) and report["left_out"] == []
    permuted = [f"model.layers.{i}.self_attn.{p}_proj.{w}" for i in range(2) for p in "qk" for w in ("weight", "bias")]
    assert report["unpermuted"] == (permuted if arch == "llama" else [])
    if arch == "llama":  # q_proj was Q8_0: un-permuted from its dequantized rows, a head at a time
        assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_k.weight"] == "F32"


def _hf_to_gguf(arch, model) -> dict:
    ids = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    names = gguf.get_tensor_name_map(ids[arch], model.config.num_hidden_layers)
    return {n: names.get_name(n.rsplit(".", 1)[0]) + "." + n.rsplit(".", 1)[1] for n in model.state_dict()}


def test_without_names_hf_the_names_stay_ggufs(cli, written, tmp_path):
    arch, model, path, types = written
    result = cli("inspect", path, "--json")
    assert [t["name"] for t in json.loads(result.out)["tensors"]] == list(types)
    assert "hf_names" not in json.loads(result.out)


def test_inspect_names_hf_lists_hugging_face_names(cli, written):
    arch, model, path, types = written
    result = cli("inspect", path, "--names", "hf", "--json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert [t["name"] for t in doc["tensors"]] == list(transformers_reads(path, model))
    assert doc["hf_names"]["architecture"] == arch
    dtypes = {t["name"]: t["dtype"] for t in doc["tensors"]}  # a quantized tensor's GGML type, un-permuted or not
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "Q8_0" and dtypes["model.layers.0.mlp.up_proj.weight"] == "Q8_0"
    human = cli("inspect", path, "--names", "hf")
    assert "model.layers.1.mlp.down_proj.weight" in human.out and "blk." not in human.out
    assert "--names hf: " in human.err


def test_rope_freqs_is_left_out_and_reported(cli, tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "rope.gguf"
    write_like_llama_cpp(model, path, "llama", rope_freqs=True)
    out = tmp_path / "out.safetensors"
    result = cli("convert", path, "--names", "hf", "-o", out)
    assert result.code == 0, result.err
    assert "left out (no Hugging Face name) (1): rope_freqs.weight" in result.err
    assert "rope_freqs.weight" not in load_file(str(out))
    doc = json.loads(cli("convert", path, "--names", "hf", "-o", out, "--force", "--json").out)
    assert doc["hf_names"]["left_out"] == ["rope_freqs.weight"]


def test_a_mistral_gguf_is_llama(cli, tmp_path):
    """llama.cpp writes Mistral models as architecture llama, q/k permuted as Llama's."""
    model = tiny_model("llama")
    path = tmp_path / "mistral.gguf"
    write_like_llama_cpp(model, path, "llama", name="mistral-tiny")
    out = tmp_path / "out.safetensors"
    assert cli("convert", path, "--names", "hf", "-o", out).code == 0
    got, want = load_file(str(out)), transformers_reads(path, model)
    assert list(got) == list(want) and all(np.array_equal(got[n].astype(np.float32), want[n].numpy()) for n in want)


def test_another_architecture_is_refused_in_one_line(cli, tmp_path):
    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_error_line(cli("convert", path, "--names", "hf", "-o", tmp_path / "o.safetensors"),
                          "'phi2'", "llama, qwen2, qwen3", "omit --names hf")
    assert not (tmp_path / "o.safetensors").exists()
    assert cli("convert", path, "-o", tmp_path / "o.safetensors").code == 0  # GGUF's names: any architecture


def test_names_hf_on_a_safetensors_input_is_wrong_usage(cli, tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": np.ones(3, np.float32)}, str(path))
    assert_one_error_line(cli("convert", path, "--names", "hf", "-o", tmp_path / "o.safetensors"),
                          "--names hf", "omit --names hf", code=2)
    assert_one_error_line(cli("inspect", path, "--names", "hf"), "--names hf", code=2)
    assert cli("convert", path, "--names", "gguf", "-o", tmp_path / "o.safetensors").code == 0


def test_names_is_a_real_choice(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert cli("convert", "x.gguf", "--names", "huggingface", "-o", tmp_path / "o.safetensors").code == 2
    for command in ("inspect", "convert", "filter", "drop", "rename", "merge", "diff"):
        text = cli(command, "--help").out
        assert "--names" in text and "gguf" in text and "hf" in text, command


def test_diff_of_a_gguf_against_the_original_model(cli, written, tmp_path):
    """The use: is this GGUF the model I had? Its F32 tensors equal, the rest near (F16, Q8_0)."""
    arch, model, path, types = written
    original = tmp_path / "original.safetensors"
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    save_file(state, str(original))
    result = cli("diff", path, original, "--names", "hf", "--atol", "0.01", "--json")
    doc = json.loads(result.out)
    assert result.code == 0, (doc["value_changed"], doc["only_in_a"], doc["only_in_b"])
    assert doc["hf_names"]["renamed"] == len(state)


def test_filter_and_drop_take_the_hf_names(cli, written, tmp_path):
    arch, model, path, types = written
    out = tmp_path / "layer1.safetensors"
    assert cli("filter", path, "--names", "hf", "--keep", "model.layers.1", "-o", out).code == 0
    want = {k: v for k, v in transformers_reads(path, model).items() if k.startswith("model.layers.1.")}
    got = load_file(str(out))
    assert list(got) == list(want) and all(np.array_equal(got[k].astype(np.float32), want[k].numpy()) for k in want)
    out2 = tmp_path / "dropped.safetensors"
    assert cli("drop", path, "model.embed_tokens", "--names", "hf", "-o", out2).code == 0
    assert "model.embed_tokens.weight" not in load_file(str(out2))


def test_merge_and_rename_take_the_hf_names(cli, tmp_path):
    model = tiny_model("qwen3")
    path = tmp_path / "q.gguf"
    write_like_llama_cpp(model, path, "qwen3")
    out = tmp_path / "avg.safetensors"
    result = cli("merge", path, path, "--average", "--names", "hf", "-o", out, "--json")
    assert result.code == 0, result.err
    want = transformers_reads(path, model)
    got = load_file(str(out))
    assert set(got) == set(want)
    assert np.allclose(got["model.layers.0.self_attn.q_norm.weight"], want["model.layers.0.self_attn.q_norm.weight"])
    doc = json.loads(result.out)["hf_names"]
    assert doc["architecture"] == "qwen3" and doc["renamed"] == 2 * len(want)
    renamed = tmp_path / "renamed.safetensors"
    assert cli("rename", path, "--names", "hf", "--strip-prefix", "model", "-o", renamed).code == 0
    assert "layers.0.self_attn.k_norm.weight" in load_file(str(renamed))
    assert_one_error_line(cli("merge", "--config", tmp_path / "r.yml", "--names", "hf", "-o", tmp_path / "m"),
                          "--config does not combine with --names", code=2)


def test_un_permuting_reads_one_heads_rows_at_a_time(tmp_path, monkeypatch):
    """A chunk per head: the mapped file (F32 k_proj) and the dequantized blocks (Q8_0 q_proj) are
    asked for one head's rows at a time, never the whole tensor."""
    from ckptsurgery.io import gguf as io_gguf, open_checkpoint
    from ckptsurgery.io.model import MappedFile
    from ckptsurgery.ops.gguf_names import hf_names

    model = tiny_model("llama")
    path = tmp_path / "llama.gguf"
    write_like_llama_cpp(model, path, "llama")
    asked = []
    for cls in (MappedFile, io_gguf._Blocks):
        real = cls.view
        monkeypatch.setattr(cls, "view", lambda self, offset, nbytes, real=real: asked.append(nbytes) or real(self, offset, nbytes))
    with open_checkpoint(str(path)) as ckpt:
        renamed, done = hf_names(ckpt)
        for name, heads in (("model.layers.0.self_attn.k_proj.weight", 2), ("model.layers.0.self_attn.q_proj.weight", 4)):
            t = renamed.tensors[name]
            asked.clear()
            data = bytes(t.data())
            per_head = t.nbytes // heads
            # one view a head (a quantized head: its float rows, then its blocks in the file)
            assert len(asked) == heads * (1 if t.encoded is None else 2) and max(asked) == per_head, (name, asked)
            assert np.array_equal(np.frombuffer(data, np.float32).reshape(t.shape),
                                  transformers_reads(path, model)[name].numpy())


def test_a_llama_without_a_usable_head_count_is_refused_in_one_line(cli, tmp_path):
    """The q/k projections cannot be un-permuted without the head count: refused before anything is
    written, naming the key; a shape that does not split into the heads likewise."""
    for heads, fragment in ((None, "llama.attention.head_count is None"), (5, "does not split into 5 heads")):
        path = tmp_path / f"heads-{heads}.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_block_count(1)
        if heads is not None:
            w.add_head_count(heads)
        w.add_tensor("blk.0.attn_q.weight", np.ones((64, 32), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        out = tmp_path / "o.safetensors"
        assert_one_error_line(cli("convert", path, "--names", "hf", "-o", out), fragment, "blk.0.attn_q.weight"
                              if heads else "un-permuted")
        assert not out.exists()
