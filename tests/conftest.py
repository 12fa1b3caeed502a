"""Tiny random models of every supported family, GQA and not, for fast exact tests."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

TINY = {
    "llama-mha": (LlamaConfig, {"num_attention_heads": 4, "num_key_value_heads": 4}),
    "llama-gqa": (LlamaConfig, {"num_attention_heads": 6, "num_key_value_heads": 2}),
    "llama-bias": (
        LlamaConfig,
        {"num_attention_heads": 4, "num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True},
    ),
    "mistral-gqa": (MistralConfig, {"num_attention_heads": 8, "num_key_value_heads": 2}),
    "qwen2-gqa": (Qwen2Config, {"num_attention_heads": 6, "num_key_value_heads": 3}),
    "qwen2-mha": (Qwen2Config, {"num_attention_heads": 4, "num_key_value_heads": 4}),
}


def make_tiny(name: str, seed: int = 0, layers: int = 4) -> torch.nn.Module:
    """A random model with real structure: 4 layers, hidden 48, head_dim 8, 40 MLP channels."""
    config_cls, extra = TINY[name]
    config = config_cls(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=layers,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # biases start at zero; make them matter
        for name_, p in model.named_parameters():
            if name_.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(params=sorted(TINY))
def tiny_model(request) -> torch.nn.Module:
    return make_tiny(request.param)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))


WORDS = [
    "the",
    "model",
    "prunes",
    "heads",
    "and",
    "channels",
    "while",
    "calibration",
    "text",
    "guides",
    "which",
    "weights",
    "matter",
    "most",
    "for",
    "language",
    "modelling",
    "on",
    "held",
    "out",
    "data",
    "small",
    "models",
    "run",
    "fast",
    "on",
    "two",
    "cores",
]


def write_corpus(path, documents: int = 60, words: int = 120, seed: int = 0) -> None:
    """A local .txt source: documents separated by blank lines, pseudo-random but deterministic."""
    rng = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(documents):
        idx = torch.randint(0, len(WORDS), (words,), generator=rng).tolist()
        docs.append(" ".join(WORDS[i] for i in idx) + ".")
    path.write_text("\n\n".join(docs) + "\n")


def make_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained on the fly, so tests need no download."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS)] * 20, vocab_size=vocab_size, min_frequency=1, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="</s>", bos_token="<s>")


def save_tiny(directory, name: str = "llama-gqa") -> None:
    """A saved tiny model of family ``name`` with a tokenizer, as a user would have it."""
    tokenizer = make_tokenizer()
    config_cls, extra = TINY[name]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=4,
        head_dim=8,
        max_position_embeddings=256,
        **extra,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture
def tiny_model_dir(tmp_path, monkeypatch):
    """``tmp_path`` with a saved tiny LLaMA-GQA model (``tiny/``) and a local corpus (``corpus.txt``)."""
    monkeypatch.setenv("ADAPRUNER_CACHE", str(tmp_path / "cache"))
    save_tiny(tmp_path / "tiny")
    write_corpus(tmp_path / "corpus.txt")
    return tmp_path


def supernet_search_setup(root, **space_options):
    """A corpus big enough for the supernet's refit windows, a small search space over it and the
    search() keyword arguments that go with it: the per-layer (and uniform) stage tests share them."""
    from adapruner.search import SearchSpace

    corpus = root / "big.txt"
    write_corpus(corpus, documents=300, words=200)
    options = {"sources": [str(corpus)], "num_samples": [4, 10], "metrics": ["element1", "wifv"]}
    options |= {"supernet_data": [str(corpus)], "refit_calibration": "64x32"}
    space = SearchSpace(**(options | space_options))
    kwargs = {"pool_per_source": 10, "objective_data": str(corpus), "objective_tokens": 512, "objective_seq_len": 16}
    return corpus, space, kwargs


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on shared cores each op would wait for a descheduled one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pruned_tiny(root, ratio: float = 0.3, layers: str = "1:4"):
    """``root/tiny`` (a saved tiny LLaMA-GQA), ``root/corpus.txt`` and ``root/pruned``: ``ratio`` of it
    removed in ``layers`` only, so the layers have mixed sizes (the dense model is the pruned one's
    ``source_model``)."""
    import adapruner

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADAPRUNER_CACHE", str(root / "cache"))
        save_tiny(root / "tiny")
        write_corpus(root / "corpus.txt")
        adapruner.prune(
            str(root / "tiny"),
            ratio,
            output=root / "pruned",
            calibration=str(root / "corpus.txt"),
            seq_len=16,
            layers=layers,
        )
    return root


def name_tokenizer_for_llama_cpp(model_dir, monkeypatch) -> None:
    """Register the tiny byte-level BPE of ``model_dir`` as llama.cpp's "gpt-2" pre-tokenizer (it splits text
    as GPT-2 does), so the GGUF exporter can name it; undone when the test ends."""
    from transformers import AutoTokenizer

    from adapruner.export import tokenizer as vocab

    digest = vocab.check_text_hash(AutoTokenizer.from_pretrained(model_dir))
    monkeypatch.setitem(vocab.KNOWN_PRE_TOKENIZERS, digest, "gpt-2")
