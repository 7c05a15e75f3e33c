"""A real Lightning Trainer with deltawatch's Lightning callback, through a real sidecar: the
recipe of docs/frameworks.md ("Lightning") runs as written. A LightningModule around tiny_qwen3
trains 4 steps of SGD; checks at steps 2 and 4 must carry the 14 block matrices under their names,
with ‖ΔW‖_F and the bf16-visible ratio equal to float64 from the weights before and after."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))

lightning = pytest.importorskip("lightning")  # the "lightning" extra
pytest.importorskip("transformers")

import test_adapters_lora  # noqa: E402
from deltawatch.sidecar.process import SidecarProcess  # noqa: E402
from run_hf import Tokens, tiny_qwen3  # noqa: E402
from test_hf_trainer import check_arrivals  # noqa: E402

pytestmark = pytest.mark.timeout(120)
one_thread = test_adapters_lora.one_thread  # fixture: one intra-op thread

DOC = (Path(__file__).resolve().parents[1] / "docs" / "frameworks.md").read_text()
(RECIPE,) = re.findall(
    r"```python\n(.*?)```", DOC.split("## Lightning", 1)[1].split("\n## ", 1)[0], flags=re.S
)


class CausalLM(lightning.LightningModule):
    """tiny_qwen3's body and head as a LightningModule (names `model.layers.…` as in HF)."""

    def __init__(self) -> None:
        super().__init__()
        qwen = tiny_qwen3()
        self.model, self.lm_head = qwen.model, qwen.lm_head

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hidden = self.model(input_ids=batch["input_ids"]).last_hidden_state
        logits = self.lm_head(hidden)[:, :-1]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_the_lightning_recipe_reports_every_block_matrix_exactly(tmp_path):
    torch.manual_seed(0)
    module = CausalLM()
    W0 = {n: p.detach().clone() for n, p in module.named_parameters() if p.dim() == 2}
    loader = torch.utils.data.DataLoader(Tokens(16, 16, 128), batch_size=4)
    small = (
        'max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, '
        f"enable_progress_bar=False, enable_model_summary=False, default_root_dir={str(tmp_path)!r}"
    )
    with SidecarProcess(tmp_path / "data") as side:
        code = RECIPE.replace('"127.0.0.1:50051"', repr(side.endpoint))
        code = code.replace("every=10", "every=2").replace("max_steps=1000", small)
        assert side.endpoint in code and "every=2" in code and "max_steps=4" in code
        scope = {"module": module, "loader": loader}
        exec(compile(code, "docs/frameworks.md", "exec"), scope)
        assert scope["trainer"].global_step == 4
        detail = side.run("qwen3-lightning")
        histories = {
            m["matrix"]: list(side.history("qwen3-lightning", m["matrix"]).values())
            for m in detail["matrices"]
        }
    WT = {n: p.detach() for n, p in module.named_parameters() if p.dim() == 2}
    check_arrivals(detail, histories, W0, WT)
