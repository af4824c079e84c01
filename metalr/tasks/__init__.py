"""Few-shot task sources: the protocol, sinusoid regression, rendered glyphs, Omniglot folders."""

from metalr.tasks.base import TaskBatch, TaskSampler, check_task_batch

__all__ = ["TaskBatch", "TaskSampler", "check_task_batch"]
