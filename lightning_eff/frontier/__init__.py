"""frontier: the efficiency-frontier search (`lightning-eff -m hydra/sweeper=frontier`) and its report."""

from lightning_eff.frontier.app import answer_repeat, frontier_callbacks, in_frontier_sweep, objectives_for_sweep
from lightning_eff.frontier.callback import FrontierTrial
from lightning_eff.frontier.objectives import Objectives, objectives_from_report
from lightning_eff.frontier.pareto import dominates, pareto_front
from lightning_eff.frontier.report import build_frontier, write_frontier
from lightning_eff.frontier.trial import TrialHandle, current_trial, pass_trial_number

__all__ = [
    "FrontierTrial",
    "Objectives",
    "TrialHandle",
    "answer_repeat",
    "build_frontier",
    "current_trial",
    "dominates",
    "frontier_callbacks",
    "in_frontier_sweep",
    "objectives_for_sweep",
    "objectives_from_report",
    "pareto_front",
    "pass_trial_number",
    "write_frontier",
]
