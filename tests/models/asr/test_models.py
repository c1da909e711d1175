import pytest
import torch

from dpfl.models.asr.models import SIZES, build_asr_model
from dpfl.models.asr.text import CharTokenizer, cer, error_counts, greedy_decode, wer


def count(model):
    params = list(model.parameters())
    return len(params), sum(p.numel() for p in params)


def test_paper_size_on_the_meta_device():
    with torch.device("meta"):
        model = build_asr_model("transformer", "paper")
    tensors, params = count(model)
    assert tensors == 296
    assert params == pytest.approx(255.8e6, rel=5e-4)
    assert all(p.is_meta for p in model.parameters())


def test_named_sizes_and_shapes():
    tiny = build_asr_model("transformer", "tiny")
    assert count(tiny)[1] < 1_000_000
    small = build_asr_model("transformer", "small")
    assert 5e6 < count(small)[1] < 20e6
    waves = torch.randn(2, 32000)
    lengths = torch.tensor([32000, 16000])
    for model in (tiny, build_asr_model("conformer", "tiny")):
        log_probs, out = model(waves, lengths)
        # 10 ms frames inside the utterance, then a stride-3 convolution
        # frames whose 25 ms window lies inside the utterance: (32000 - 200) // 160 + 1 = 199,
        # then the stride-3 convolution: (199 - 1) // 3 + 1 = 67
        assert out.tolist() == [67, 33]
        assert log_probs.shape == (2, 67, 30)
        assert torch.allclose(log_probs.exp().sum(-1), torch.ones(2, 67), atol=1e-5)
        assert not any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()
        )


def test_dense_layers_have_no_biases():
    model = build_asr_model("transformer", "tiny")
    for block in model.blocks:
        assert block.attn.in_proj_bias is None and block.attn.out_proj.bias is None
        assert all(layer.bias is None for layer in block.mlp if isinstance(layer, torch.nn.Linear))
    assert len(model.blocks) == SIZES["tiny"].blocks


def test_an_utterance_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    model = build_asr_model("transformer", "tiny").eval()
    wave = torch.randn(1, 16000)
    alone, n = model(wave, torch.tensor([16000]))
    padded = torch.cat([wave, torch.zeros(1, 24000)], dim=1)
    batch = torch.cat([padded, torch.randn(1, 40000)])
    together, m = model(batch, torch.tensor([16000, 40000]))
    assert n[0] == m[0]
    assert torch.allclose(alone[0], together[0, : n[0]], atol=1e-4)


def test_bad_model_names():
    known = "tiny, deep, small, paper"
    with pytest.raises(ValueError, match=f"unknown ASR size 'huge'; known: {known}"):
        build_asr_model("transformer", "huge")
    with pytest.raises(ValueError, match="unknown ASR architecture 'rnn'"):
        build_asr_model("rnn", "tiny")
    with pytest.raises(ValueError, match="dropout"):
        build_asr_model("transformer", "tiny", dropout=1.5)


def test_tokenizer_decoding_and_error_rates():
    tok = CharTokenizer()
    assert tok.vocab_size == 30 and tok.blank == 0
    assert tok.normalize("Hello,  World! It's well-known.") == "hello world it's well-known"
    assert tok.decode(tok.encode("it's a dog")) == "it's a dog"
    # best path h h _ e l _ l o  ->  "hello" (repeats merged, blank separates the two l's)
    path = [tok.encode(c)[0] if c != "_" else 0 for c in "hh_el_lo"]
    log_probs = torch.full((1, len(path), 30), -10.0)
    log_probs[0, torch.arange(len(path)), torch.tensor(path)] = 0.0
    assert greedy_decode(log_probs, torch.tensor([len(path)]), tok) == ["hello"]
    assert wer(["the cat sat"], ["the cat sat on"]) == pytest.approx(0.25)
    assert wer(["a b c"], ["a x c"]) == pytest.approx(1 / 3)
    assert cer(["abd"], ["abc"]) == pytest.approx(1 / 3)
    assert error_counts(["", "x"], ["ab", "x"]) == {
        "word_errors": 1,
        "words": 2,
        "char_errors": 2,
        "chars": 3,
    }
