"""Evaluation: LC win rate, PersonaFeedback accuracy, PersonaMem accuracy, reports.

| module | job |
| --- | --- |
| `lc_winrate` | raw and length-controlled win rates (AlpacaEval's length_controlled_minimal) |
| `pairwise` | pairwise judge prompt, verdict parsing, both-orders averaging, position statistics |
| `endpoint` | OpenAI-compatible client (retries with back-off, concurrency) and judges on it |
| `scorers` | pointwise rewards: any GRM judge, a Bradley-Terry model; scorer as pairwise judge |
| `judges` | the configured judges (`eval.judge`, `grm.backend`) |
| `generate` | the evaluated policy's answers through the training engines and prompts |
| `winrate`, `personafeedback`, `personamem` | the three `cpe-ray eval` commands |
| `report` | JSON, Markdown and PNG writers |
| `cli` | `add_eval_commands`, wired into `cpe-ray` |

Heavy imports (torch, transformers, openai, sklearn, matplotlib) happen inside functions.
"""

from cpe_ray.evaluation.lc_winrate import WinRateResult, lc_winrate

__all__ = ["WinRateResult", "lc_winrate"]
