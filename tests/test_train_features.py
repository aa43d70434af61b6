"""Training beyond the basics: row formats and their loss weights, packing, LoRA and fusing, gradient
accumulation and checkpointing, bf16, and the chunked backward through a whole model."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import sentencepiece
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_gdn.convert import to_hf
from mlx_gdn.data import batch_at, encode_row, pack
from mlx_gdn.loading import load, load_tokenizer
from mlx_gdn.lora import LoraConfig, apply_lora, fuse
from mlx_gdn.models import Model, ModelArgs, PRESETS, load_model, save_model
from mlx_gdn.ops import gated_delta
import mlx_gdn.train as training
from mlx_gdn.train import TrainConfig, loss_fn, train

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
            "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    text = "\n".join(f"user asks {i % 5} and the assistant answers {i % 7}." for i in range(800))
    (tmp / "corpus.txt").write_text(text)
    sentencepiece.SentencePieceTrainer.train(input=str(tmp / "corpus.txt"), model_prefix=str(tmp / "tokenizer"),
                                             vocab_size=36, minloglevel=2, user_defined_symbols=["<", ">"])
    (tmp / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return tmp


def test_prompt_completion_weights_only_the_completion(tok_dir):
    tok = load_tokenizer(tok_dir)
    ids, weights = encode_row({"prompt": "user asks 3", "completion": " answers 4"}, tok)
    n_prompt = len(tok.encode("user asks 3"))
    assert ids[-1] == tok.eos_token_id and len(ids) > n_prompt + 1
    assert weights == [0.0] * n_prompt + [1.0] * (len(ids) - n_prompt)


def test_chat_rows_weight_the_assistant_turns(tok_dir):
    tok = load_tokenizer(tok_dir)
    messages = [{"role": "user", "content": "asks 1"}, {"role": "assistant", "content": "answers 2"},
                {"role": "user", "content": "asks 3"}, {"role": "assistant", "content": "answers 4"}]
    ids, weights = encode_row({"messages": messages}, tok)
    text = tok.apply_chat_template(messages)
    assert text == "<user>asks 1<assistant>answers 2</s><user>asks 3<assistant>answers 4</s>"
    assert ids == tok.encode(text)
    # the weighted tokens decode to exactly the two answers and their EOS
    weighted = [i for i, w in zip(ids, weights) if w]
    assert tok.decode(weighted).replace(" ", "") == "answers2answers4".replace(" ", "")
    assert sum(1 for i, w in zip(ids, weights) if w and i == tok.eos_token_id) == 2


def test_packing_keeps_documents_and_masks_cross_document_targets():
    examples = [([1, 2, 3], [1, 1, 1]), ([4, 5, 6, 7, 8, 9, 10], [0, 0, 1, 1, 1, 1, 1]), ([11, 12], [1, 1])]
    packed = pack(examples, seq_len=5)  # rows of 6: [1 2 3 | pad..], [4 5 6 7 8 9], [10 11 12 | pad]
    np.testing.assert_array_equal(packed.ids, [[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9], [10, 11, 12, 0, 0, 0]])
    assert packed.tokens == 12
    inputs, targets, weights, docs = batch_at(packed, np.arange(3), 0, 3)
    # row 2: 10 ends document 2's second piece; 11 starts document 3: that target is masked
    np.testing.assert_array_equal(np.array(weights), [[1, 1, 0, 0, 0], [0, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    d = np.array(docs)
    assert d[2, 0] != d[2, 1] and d[0, 2] != d[0, 3]


def test_packed_loss_equals_documents_alone():
    mx.random.seed(0)
    model = Model(ModelArgs(**PRESETS["tiny-h1"]))
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 500, n).tolist() for n in (9, 30, 20)]
    packed = pack([(d, [1.0] * len(d)) for d in docs], seq_len=60)
    assert len(packed) == 1
    inputs, targets, weights, segments = batch_at(packed, [0], 0, 1)
    ce = nn.losses.cross_entropy(model(inputs, segments=segments), targets, reduction="none")
    alone = [nn.losses.cross_entropy(model(mx.array([d[:-1]])), mx.array([d[1:]]), reduction="none")[0]
             for d in docs]
    want = np.concatenate([np.array(a) for a in alone])
    got = np.array(ce[0])[np.array(weights[0]) > 0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_chunked_backward_through_a_model_equals_the_recurrence(monkeypatch):
    mx.random.seed(1)
    model = Model(ModelArgs(**PRESETS["tiny-gdn"]))
    ids = mx.array(np.random.default_rng(1).integers(0, 500, (2, 81)))
    args = (ids[:, :-1], ids[:, 1:], mx.ones((2, 80)))
    grad = lambda: dict(tree_flatten(nn.value_and_grad(model, loss_fn)(model, *args)[1]))
    chunked = grad()
    monkeypatch.setattr(gated_delta, "RECURRENT_MAX_TOKENS", 10 ** 9)  # token loop + autodiff
    recurrent = grad()
    for name, g in chunked.items():
        np.testing.assert_allclose(np.array(g), np.array(recurrent[name]), rtol=2e-3, atol=2e-6,
                                   err_msg=name)


def test_grad_checkpoint_gives_the_same_gradients():
    mx.random.seed(2)
    model = Model(ModelArgs(**PRESETS["tiny-h1"]))
    ids = mx.array(np.random.default_rng(2).integers(0, 500, (2, 41)))
    docs = mx.array(np.repeat([[0] * 15 + [1] * 25], 2, axis=0))  # packed rows: two documents each
    for segments in (None, docs):
        args = (ids[:, :-1], ids[:, 1:], mx.ones((2, 40)), segments)
        model.model.grad_checkpoint = False
        plain = dict(tree_flatten(nn.value_and_grad(model, loss_fn)(model, *args)[1]))
        model.model.grad_checkpoint = True
        checked = dict(tree_flatten(nn.value_and_grad(model, loss_fn)(model, *args)[1]))
        for name in plain:
            np.testing.assert_allclose(np.array(checked[name]), np.array(plain[name]), rtol=1e-5, atol=1e-7)


def test_keep_chunk_pieces_reaches_every_gdn_layer(monkeypatch):
    # train.py --keep-chunk-pieces: prepare() sets it on each Gated DeltaNet layer; the gradients are
    # the same, and the backward forms no chunk pieces (counted by their inversions)
    from mlx_gdn.layers.gated_deltanet import GatedDeltaNet
    from mlx_gdn.ops import chunk
    inversions = []
    invert = chunk.invert_unit_lower
    monkeypatch.setattr(chunk, "invert_unit_lower", lambda A: inversions.append(1) or invert(A))
    mx.random.seed(3)
    model = Model(ModelArgs(**PRESETS["tiny-h1"]))
    ids = mx.array(np.random.default_rng(3).integers(0, 500, (2, 81)))
    args = (ids[:, :-1], ids[:, 1:], mx.ones((2, 80)))
    grads, counts = [], []
    for keep in (False, True):
        training.prepare(model, TrainConfig(model="-", data="-", out="-", keep_chunk_pieces=keep))
        layers = [m for m in model.modules() if isinstance(m, GatedDeltaNet)]
        assert layers and all(m.keep_chunk_pieces == keep for m in layers)
        inversions.clear()
        grads.append(dict(tree_flatten(nn.value_and_grad(model, loss_fn)(model, *args)[1])))
        counts.append(len(inversions))
    assert counts[0] == 2 * counts[1] > 0
    for name, g in grads[0].items():
        np.testing.assert_allclose(np.array(grads[1][name]), np.array(g), rtol=1e-6, atol=1e-9,
                                   err_msg=name)


H2 = dict(num_hidden_layers=3, layer_types=["mamba2", "gdn", "swa"], mamba_state_size=16, mamba_head_dim=16)


@pytest.mark.parametrize("preset,changes,checkpointed,lora", [
    ("tiny-gdn", {}, False, False), ("tiny-h1", {}, True, False), ("tiny-gdn", {}, False, True),
    ("tiny-h1", H2, False, False)])
def test_compiled_step_equals_value_and_grad(preset, changes, checkpointed, lora):
    # the compiled step (rows without document boundaries) against value_and_grad op by op, then
    # again after the weights change: the replayed graph reads the new weights, and the model keeps
    # real arrays (no tracers) after each call
    mx.random.seed(6)
    model = Model(ModelArgs(**dict(PRESETS[preset], **changes)))
    model.model.grad_checkpoint = checkpointed
    if lora:  # only the adapters train; the frozen weights are inputs of the compiled graph too
        apply_lora(model, LoraConfig(4, 8.0, -1, ("q_proj", "v_proj")))
    ids = mx.array(np.random.default_rng(6).integers(0, 500, (2, 81)))
    args = (ids[:, :-1], ids[:, 1:], mx.ones((2, 80)))
    step, plain = training.compiled_value_and_grad(model), nn.value_and_grad(model, loss_fn)
    for _ in range(2):
        loss, grads = step(*args)
        want_loss, want = plain(model, *args)
        np.testing.assert_allclose(loss.item(), want_loss.item(), rtol=1e-5)
        want = dict(tree_flatten(want))
        for name, g in tree_flatten(grads):
            np.testing.assert_allclose(np.array(g), np.array(want[name]), rtol=1e-4, atol=1e-6,
                                       err_msg=name)
        model.update(tree_map(lambda p, g: p - 0.5 * g, model.trainable_parameters(), grads))


@pytest.mark.parametrize("scale", [1.0, 80.0])  # 80: logits far past exp's float32 range unshifted
def test_cross_entropy_equals_mlx_cross_entropy(scale):
    # our one-exp cross-entropy (value and gradient) against nn.losses.cross_entropy's autodiff
    rng = np.random.default_rng(8)
    logits = mx.array(rng.standard_normal((2, 40, 37)).astype(np.float32) * scale)
    targets = mx.array(rng.integers(0, 37, (2, 40)))
    weights = mx.array(rng.uniform(0, 1, (2, 40)).astype(np.float32))
    ours = lambda x: (training.cross_entropy(x, targets) * weights).sum()
    mlx = lambda x: (nn.losses.cross_entropy(x, targets, reduction="none") * weights).sum()
    (got, got_grad), (want, want_grad) = mx.value_and_grad(ours)(logits), mx.value_and_grad(mlx)(logits)
    np.testing.assert_allclose(got.item(), want.item(), rtol=1e-6)
    np.testing.assert_allclose(np.array(got_grad), np.array(want_grad), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tied", [False, True])
def test_loss_in_blocks_equals_the_whole_loss(monkeypatch, tied):
    # 7-token blocks (the last one shorter), weighted targets, packed documents: the loss and every
    # gradient as with the whole [B, T, vocab] logits at once
    mx.random.seed(5)
    model = Model(ModelArgs(**dict(PRESETS["tiny-gdn"], tie_word_embeddings=tied)))
    rng = np.random.default_rng(5)
    ids = mx.array(rng.integers(0, 500, (2, 41)))
    weights = mx.array(rng.uniform(0, 1, (2, 40)).astype(np.float32))
    docs = mx.array(np.repeat([[0] * 15 + [1] * 25], 2, axis=0))
    args = (ids[:, :-1], ids[:, 1:], weights, docs)
    monkeypatch.setattr(training, "LOSS_BLOCK_LOGITS", 2 * 512 * 7)
    loss, grads = nn.value_and_grad(model, loss_fn)(model, *args)
    monkeypatch.setattr(training, "LOSS_BLOCK_LOGITS", 1 << 40)
    whole_loss, whole = nn.value_and_grad(model, loss_fn)(model, *args)
    np.testing.assert_allclose(loss.item(), whole_loss.item(), rtol=1e-6)
    whole = dict(tree_flatten(whole))
    for name, g in tree_flatten(grads):
        # atol: a whole loss keeps its softmax for the backward (train.cross_entropy), blocks take
        # nn.losses.cross_entropy's autodiff: the same math, rounded differently
        np.testing.assert_allclose(np.array(g), np.array(whole[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_lora_fused_equals_model_with_adapters(tmp_path):
    mx.random.seed(3)
    model = Model(ModelArgs(**PRESETS["tiny-h1"]))
    apply_lora(model, LoraConfig(rank=4, alpha=8, layers=2))
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)
    assert all(k.startswith(("model.layers.2.", "model.layers.3.")) for k in trainable)
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.1)  # non-zero adapters
                                 for k, v in tree_flatten(model.trainable_parameters())]))
    ids = mx.array([[1, 5, 9, 13, 2, 7, 30, 4]])
    with_adapters = np.array(model(ids))
    save_model(model, tmp_path / "lora")  # base + adapters, reloaded as such
    assert (tmp_path / "lora" / "adapters.safetensors").is_file()
    np.testing.assert_allclose(np.array(load_model(tmp_path / "lora")(ids)), with_adapters, rtol=1e-5, atol=1e-5)
    fuse(model)
    assert not any("lora" in k for k, _ in tree_flatten(model.parameters()))
    np.testing.assert_allclose(np.array(model(ids)), with_adapters, rtol=1e-4, atol=1e-4)
    to_hf(tmp_path / "lora", tmp_path / "hf")  # --to-hf fuses too
    hf = mx.load(str(tmp_path / "hf" / "model.safetensors"))
    for name, value in tree_flatten(model.parameters()):
        np.testing.assert_allclose(np.array(hf[name]), np.array(value), rtol=1e-5, atol=1e-6, err_msg=name)


def chat_data(tmp_path, n=120):
    rows = []
    for i in range(n):
        rows.append({"messages": [{"role": "user", "content": f"asks {i % 5}"},
                                  {"role": "assistant", "content": f"answers {(i % 5) + 1}"}]})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "data" / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    return tmp_path / "data"


def base_model(tok_dir, tmp_path):
    mx.random.seed(4)
    model = Model(ModelArgs(**dict(PRESETS["tiny-gdn"], vocab_size=40)))
    files = [tok_dir / "tokenizer.model", tok_dir / "tokenizer_config.json"]
    save_model(model, tmp_path / "base", extra_files=files)
    return tmp_path / "base"


def test_lora_training_touches_only_adapters_and_fuses(tok_dir, tmp_path):
    base = base_model(tok_dir, tmp_path)
    data = chat_data(tmp_path)
    cfg = TrainConfig(model=str(base), data=str(data), out=str(tmp_path / "run"), seq_len=32, batch_size=4,
                      iters=30, warmup=2, lr=1e-2, save_every=15, eval_every=15, lora_rank=4, lora_alpha=8)
    train(cfg, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert rows[-1]["valid_loss"] < rows[0]["loss"]
    before = dict(tree_flatten(load_model(base).parameters()))
    after_model = load_model(tmp_path / "run" / "model")
    after = {k.replace(".linear.", "."): v for k, v in tree_flatten(after_model.parameters())}
    for name, value in before.items():  # the base weights did not move
        np.testing.assert_array_equal(np.array(after[name]), np.array(value), err_msg=name)
    assert any(k.endswith("lora_b") and np.abs(np.array(v)).max() > 0 for k, v in after.items())
    cfg_fused = TrainConfig(**dict(vars(cfg), out=str(tmp_path / "fused"), fuse=True))
    fused = train(cfg_fused, progress=False)
    ids = mx.array([[1, 5, 9, 13, 2, 7]])
    np.testing.assert_allclose(np.array(load_model(tmp_path / "fused" / "model")(ids)),
                               np.array(after_model(ids)), rtol=1e-4, atol=1e-4)
    assert not (tmp_path / "fused" / "model" / "adapters.safetensors").exists()
    model, tok = load(str(tmp_path / "fused" / "model"))
    assert tok.chat_template == TEMPLATE and fused is not None


def test_grad_accumulation_matches_a_larger_batch(tok_dir, tmp_path):
    base = base_model(tok_dir, tmp_path)
    (tmp_path / "text.txt").write_text(" ".join(f"user asks {i % 5}" for i in range(600)))
    common = dict(model=str(base), data=str(tmp_path / "text.txt"), seq_len=16, iters=6, warmup=1,
                  lr=3e-3, save_every=100)
    a = train(TrainConfig(**common, out=str(tmp_path / "a"), batch_size=4), progress=False)
    b = train(TrainConfig(**common, out=str(tmp_path / "b"), batch_size=2, grad_accum=2), progress=False)
    wa, wb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    for name in wa:
        np.testing.assert_allclose(np.array(wb[name]), np.array(wa[name]), rtol=1e-3, atol=1e-5, err_msg=name)


def test_bf16_training_and_epochs(tok_dir, tmp_path):
    base = base_model(tok_dir, tmp_path)
    data = chat_data(tmp_path, n=40)
    model = train(TrainConfig(model=str(base), data=str(data), out=str(tmp_path / "run"), seq_len=32,
                              batch_size=4, epochs=2, warmup=1, lr=3e-3, save_every=100,
                              dtype="bfloat16"), progress=False)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "log.jsonl")]
    assert len(steps) > 0 and len(steps) % 2 == 0  # two passes of the same number of steps
    params = dict(tree_flatten(model.parameters()))
    assert params["model.layers.0.attn.q_proj.weight"].dtype == mx.bfloat16
    assert params["model.layers.0.attn.A_log"].dtype == mx.float32
