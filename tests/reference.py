"""Hugging Face `transformers` as the reference: greedy decode with the logits of every step."""

from __future__ import annotations

import torch


def load_reference(checkpoint_dir, dtype=torch.float32):
    transformers = __import__("transformers")
    model = transformers.MixtralForCausalLM.from_pretrained(str(checkpoint_dir), dtype=dtype)
    return model.eval()


@torch.no_grad()
def reference_greedy(model, prompt_ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and fp32 logits [steps, V] (prefill's last position first), one prompt at a time
    so no padding is involved. EOS does not stop it (the comparison runs with ignore_eos)."""
    transformers = __import__("transformers")
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=steps, min_new_tokens=0,
                                           eos_token_id=None, pad_token_id=0, bos_token_id=1)
    out = model.generate(torch.tensor([prompt_ids], device=model.device), generation_config=config, output_logits=True,
                         return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    return tokens, torch.stack([step[0].float() for step in out.logits]).cpu()
