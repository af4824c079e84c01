"""Few-shot task sources: the protocol, sinusoid regression, rendered glyphs, Omniglot folders."""

from metalr.tasks.base import TaskBatch, TaskSampler, check_task_batch
from metalr.tasks.glyphs import GlyphAugment, GlyphBank, GlyphTasks, glyph_scripts, load_glyph_bank
from metalr.tasks.learn2learn_adapter import Learn2LearnTasks, from_learn2learn, learn2learn_tasks
from metalr.tasks.omniglot import OmniglotFolder, OmniglotTasks
from metalr.tasks.sinusoid import SinusoidParams, SinusoidTasks

__all__ = [
    "GlyphAugment",
    "GlyphBank",
    "GlyphTasks",
    "Learn2LearnTasks",
    "OmniglotFolder",
    "OmniglotTasks",
    "SinusoidParams",
    "SinusoidTasks",
    "TaskBatch",
    "TaskSampler",
    "check_task_batch",
    "from_learn2learn",
    "glyph_scripts",
    "learn2learn_tasks",
    "load_glyph_bank",
]
