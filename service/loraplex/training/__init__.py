"""Fine-tuning: validate a JSONL training file, train a LoRA adapter on the base model, write it for serving.

`datasets` parses and tokenizes files, `hyperparams` checks and resolves what a job asks for, `trainer`
runs one job in-process. Queueing, persistence and the HTTP routes live elsewhere and call `train_lora`.
The trainer's names load on first use (PEP 562), so the API, which imports this package for files and
jobs, never loads the trainer.
"""
from loraplex.training.datasets import (
    ChatExample,
    ChatMessage,
    DatasetError,
    ParsedDataset,
    PromptCompletion,
    TokenizedDataset,
    tokenize_dataset,
    tokenize_example,
    validate_jsonl,
)
from loraplex.training.hyperparams import HyperparameterError, Hyperparameters, ResolvedHyperparameters

__all__ = [
    "ChatExample",
    "ChatMessage",
    "DatasetError",
    "HyperparameterError",
    "Hyperparameters",
    "ParsedDataset",
    "PromptCompletion",
    "ResolvedHyperparameters",
    "TokenizedDataset",
    "TrainEvent",
    "TrainResult",
    "TrainingCancelled",
    "tokenize_dataset",
    "tokenize_example",
    "train_lora",
    "validate_jsonl",
]

_TRAINER_NAMES = ("TrainEvent", "TrainResult", "TrainingCancelled", "train_lora")


def __getattr__(name: str):
    if name in _TRAINER_NAMES:
        from loraplex.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
