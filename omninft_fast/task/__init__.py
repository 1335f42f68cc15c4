"""The synthetic text-to-audio-video task of the CPU default, and flow-matching pre-training of its base policy."""

from omninft_fast.task.synthetic import SyntheticAVTask, TaskSpec, all_prompts, parse_prompt

__all__ = ["SyntheticAVTask", "TaskSpec", "all_prompts", "parse_prompt"]
