"""Comprehension on TokLIP tokens: an LLaVA-style model (visual features -> projector -> a causal LM),
its two training stages, its data, answers and scores."""

from .conversation import Conversation, MalformedRecord, PromptFormat, Question, Turn, read_conversations, read_questions
from .data import CaptionShardDataModule, ConversationDataModule
from .evaluation import answer_questions, caption_scores, question_accuracy
from .language_model import load_language_model, make_tiny_language_model
from .model import Projector, VisualLanguageModel, splice_image_tokens
from .module import ComprehensionModule, load_comprehension
from .vision import VISUAL_INPUTS, build_visual_input

__all__ = [
    "VISUAL_INPUTS",
    "CaptionShardDataModule",
    "ComprehensionModule",
    "Conversation",
    "ConversationDataModule",
    "MalformedRecord",
    "Projector",
    "PromptFormat",
    "Question",
    "Turn",
    "VisualLanguageModel",
    "answer_questions",
    "build_visual_input",
    "caption_scores",
    "load_comprehension",
    "load_language_model",
    "make_tiny_language_model",
    "question_accuracy",
    "read_conversations",
    "read_questions",
    "splice_image_tokens",
]
