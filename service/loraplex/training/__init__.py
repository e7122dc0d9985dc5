"""Fine-tuning: validate a JSONL training file, train a LoRA adapter on the base model, write it for serving.

`datasets` parses and tokenizes files, `hyperparams` checks and resolves what a job asks for, `trainer`
runs one job in-process. Queueing, persistence and the HTTP routes live elsewhere and call `train_lora`.
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
from loraplex.training.trainer import TrainEvent, TrainingCancelled, TrainResult, train_lora

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
