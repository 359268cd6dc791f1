"""onnxruntime-genai: generation only (no logits per position, no embed/unembed), so not a full Session.

Used to prove an onnx-cpu folder runs as is in the runtime phone apps embed."""

from __future__ import annotations

from pathlib import Path


def genai_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai loading the artifact folder itself."""
    import onnxruntime_genai as og

    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    out: list[int] = []
    while len(out) < n and not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out
