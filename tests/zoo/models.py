"""A zoo of the models users bring, tiny and random-initialized, built in-process (nothing is downloaded).

Hugging Face GPT-2 (HF `Conv1D`, tied head), BERT and BERT-MLM (tied decoder), Llama tied and untied (gated
MLP, grouped-query attention), a torchvision-style ResNet (BasicBlocks, BatchNorm, residual adds, a downsample
branch), a timm-style ViT (patch conv, packed qkv Linear, cls token), PyTorch's own `nn.TransformerEncoder`
(batch_first, with its eval fast path) and a MobileNet-style depthwise-separable CNN. torchvision and timm have
no wheel matching the CPU torch build here, so the vision models are written out below in their style.

Every entry gives the model, an example batch, how to read the model's logits, and a loss, so capability tests
can train, compare and export any of them the same way (`ZooTask`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F

VOCAB = 96
SEQ = 16
IMAGE = 16
CLASSES = 10


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model.

    Args:
        name: the test id.
        build: a fresh model (seeded by the caller).
        batch: a deterministic example batch: (model kwargs, targets).
        kind: ``lm`` (next-token logits), ``encoder`` (hidden states) or ``classifier``.
        tied: pairs of parameter names that are one tensor.
    """

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], tuple[dict[str, Tensor], Tensor]]
    kind: str
    tied: tuple[tuple[str, str], ...] = ()


def logits_of(output: Any) -> Tensor:
    """The tensor a model's output means: a tensor, HF's `logits` / `last_hidden_state`, or a tuple's first."""
    if isinstance(output, Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(output, (tuple, list)):
        return logits_of(output[0])
    raise TypeError(f"cannot find the logits in a {type(output).__name__}")


def token_batch(seed: int, batch: int = 4) -> tuple[dict[str, Tensor], Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=generator)
    return {"input_ids": tokens[:, :-1]}, tokens[:, 1:]


def image_batch(seed: int, batch: int = 4) -> tuple[dict[str, Tensor], Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, IMAGE, IMAGE, generator=generator)
    return {"x": images}, torch.randint(0, CLASSES, (batch,), generator=generator)


# --- Hugging Face transformers ---------------------------------------------------------------------------


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(config)


def bert_config() -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)  # fmt: skip


def bert() -> nn.Module:
    from transformers import BertModel

    return BertModel(bert_config(), add_pooling_layer=False)


def bert_mlm() -> nn.Module:
    from transformers import BertForMaskedLM

    return BertForMaskedLM(bert_config())


def llama(tied: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                             tie_word_embeddings=tied)  # fmt: skip
        return LlamaForCausalLM(config)

    return build


# --- vision, in torchvision's and timm's style -----------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 conv-BN, a residual add, a 1x1 conv-BN downsample when needed."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width))
        self.fc = nn.Linear(2 * width, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Attention(nn.Module):
    """timm's ViT attention: one packed qkv Linear, heads split from it, an output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4, patch: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (IMAGE // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class TransformerEncoderClassifier(nn.Module):
    """PyTorch's own `nn.TransformerEncoder` (batch_first) over token embeddings, with a next-token head."""

    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(input_ids)))


class DepthwiseCNN(nn.Module):
    """MobileNet-style: a stem, depthwise 3x3 (groups = channels) + BN, pointwise 1x1 + BN, a classifier."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(width, width, 3, 1, 1, groups=width, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.pointwise = nn.Sequential(nn.Conv2d(width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.classifier = nn.Linear(2 * width, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pointwise(self.depthwise(self.stem(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


ZOO = (
    ZooEntry("gpt2", gpt2, token_batch, "lm", tied=(("lm_head.weight", "transformer.wte.weight"),)),
    ZooEntry("bert", bert, token_batch, "encoder"),
    ZooEntry(
        "bert_mlm",
        bert_mlm,
        token_batch,
        "lm",
        tied=(("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),),
    ),
    ZooEntry(
        "llama_tied", llama(tied=True), token_batch, "lm", tied=(("lm_head.weight", "model.embed_tokens.weight"),)
    ),
    ZooEntry("llama", llama(tied=False), token_batch, "lm"),
    ZooEntry("resnet", ResNet, image_batch, "classifier"),
    ZooEntry("vit", ViT, image_batch, "classifier"),
    ZooEntry("transformer_encoder", TransformerEncoderClassifier, token_batch, "lm"),
    ZooEntry("depthwise_cnn", DepthwiseCNN, image_batch, "classifier"),
)
ZOO_BY_NAME = {entry.name: entry for entry in ZOO}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ZOO_BY_NAME[name].build().eval()


def loss_of(entry: ZooEntry, model: nn.Module, batch: tuple[dict[str, Tensor], Tensor]) -> Tensor:
    inputs, targets = batch
    logits = logits_of(model(**inputs))
    if entry.kind == "encoder":
        return logits.pow(2).mean()  # a stand-in objective that reaches every weight
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class ZooTask(L.LightningModule):
    """A zoo model as a user's LightningModule: the model is a submodule, trained on deterministic batches."""

    def __init__(self, name: str, seed: int = 0, lr: float = 1e-3) -> None:
        super().__init__()
        self.entry = ZOO_BY_NAME[name]
        self.model = build(name, seed).train()
        self.lr = lr

    def forward(self, **inputs: Tensor) -> Any:
        return self.model(**inputs)

    def training_step(self, batch: tuple[dict[str, Tensor], Tensor], batch_idx: int) -> Tensor:
        loss = loss_of(self.entry, self.model, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class ZooBatches(torch.utils.data.Dataset):
    """`count` deterministic batches of a zoo entry (use with `batch_size=None`)."""

    def __init__(self, name: str, count: int = 8) -> None:
        self.entry, self.count = ZOO_BY_NAME[name], count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], Tensor]:
        return self.entry.batch(index)
