"""Tiny random-initialised models of every supported family, built offline.

Each model: 3 layers, width 32, a 64-wide FFN (penzai-style tiny named configs), random
non-trivial norm weights and biases, and a small byte-level BPE tokenizer trained in
place, saved to a folder that ``TransformerBridge.boot_transformers`` boots offline.
"""

from pathlib import Path

import torch

VOCAB = 320
TEXT = (
    "The capital of France is Paris. The capital of Italy is Rome. "
    "Memories in feed-forward layers store patterns and promote tokens. "
    "hello world, 0123456789, the quick brown fox jumps over the lazy dog."
)
_ATTN = dict(num_attention_heads=4, max_position_embeddings=128)
_GQA = dict(_ATTN, num_key_value_heads=2)
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3)

# family name -> (HF model_type, config kwargs)
CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": ("gpt2", dict(n_embd=32, n_inner=64, n_layer=3, n_head=4, n_positions=128)),
    "gpt_neox": ("gpt_neox", dict(_DECODER, **_ATTN)),
    "opt": ("opt", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=3, word_embed_proj_dim=32, **_ATTN)),
    "gptj": ("gptj", dict(n_embd=32, n_inner=64, n_layer=3, n_head=4, n_positions=128, rotary_dim=4)),
    "llama": ("llama", dict(_DECODER, **_GQA)),
    "mistral": ("mistral", dict(_DECODER, **_GQA)),
    "qwen2": ("qwen2", dict(_DECODER, **_GQA)),
    "qwen3": ("qwen3", dict(_DECODER, head_dim=8, **_GQA)),
    "gemma2": ("gemma2", dict(_DECODER, head_dim=8, final_logit_softcapping=5.0, **_GQA)),
    "gemma3": ("gemma3_text", dict(_DECODER, head_dim=8, **_GQA)),
    "phi": ("phi", dict(_DECODER, **_ATTN)),
    "phi3": ("phi3", dict(_DECODER, pad_token_id=3, **_GQA)),
    "bert": ("bert", dict(_DECODER, **_ATTN)),
}
FAMILY_NAMES = list(CONFIGS)


def train_tokenizer(folder: Path) -> None:
    """Train a byte-level BPE tokenizer on :data:`TEXT` and save it into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 20,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    specials = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.save_pretrained(folder)


def randomise_norms_and_biases(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every norm a random gain and offset and every bias a random value.

    HF initialises norms to identity and biases to zero, which would hide a missing gain,
    a missing bias or a wrong ``1 + w`` convention from the tests.
    """
    with torch.no_grad():
        for module_name, module in model.named_modules():
            is_norm = "norm" in type(module).__name__.lower() or module_name.endswith(("ln_f", "ln_1", "ln_2"))
            for name, param in module.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=generator)
                if is_norm and name == "weight":
                    param.copy_(param + 0.3 * noise)
                elif name == "bias":
                    param.copy_(0.1 * noise)


def build_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    """Create, randomise and save a tiny model of ``family`` with a tokenizer.

    Args:
        family: A key of :data:`CONFIGS`.
        folder: Where to save (created).
        seed: Seed of the weights.

    Returns:
        ``folder``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    model_type, kwargs = CONFIGS[family]
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **kwargs)
    cls = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    model = cls.from_config(config).to(torch.float32)
    randomise_norms_and_biases(model, torch.Generator().manual_seed(seed + 1))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    train_tokenizer(folder)
    return folder
