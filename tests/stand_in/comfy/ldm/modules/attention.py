"""Stand-in for comfy.ldm.modules.attention: the transformer module layout and ``optimized_attention``."""
from torch import nn


class CrossAttention(nn.Module):
    def __init__(self, query_dim, heads, dim_head):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(query_dim, inner, bias=False)
        self.to_v = nn.Linear(query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head):
        super().__init__()
        self.attn1 = CrossAttention(dim, n_heads, d_head)
        self.norm1 = nn.LayerNorm(dim)


class SpatialTransformer(nn.Module):
    def __init__(self, in_channels, n_heads, d_head, depth=1):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(n_heads * d_head, n_heads, d_head) for _ in range(depth)])


def optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                        skip_output_reshape=False, **kwargs):
    b, _, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    scores = (q.float() @ k.float().transpose(-1, -2)) * d ** -0.5
    out = scores.softmax(-1) @ v.float()
    return out.to(q.dtype).transpose(1, 2).reshape(b, -1, inner)
