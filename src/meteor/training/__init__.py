"""Fine-tuning shared by sft, refine, self_train and merge: data encoding with answer-only
labels (:mod:`.data`), the accelerate training loop (:mod:`.loop`) and LoRA (:mod:`.lora`)."""

from meteor.training.data import (IGNORE_INDEX, EncodedData, EncodedExample,
                                  LengthGroupedBatchSampler, PadCollator, RandomBatchSampler,
                                  answer_examples, encode_examples, question_answer_example)
from meteor.training.loop import TrainResult, train
from meteor.training.lora import make_trainable, save_trained
from meteor.training.session import TrainSession

__all__ = [
    "IGNORE_INDEX", "EncodedData", "EncodedExample", "LengthGroupedBatchSampler", "PadCollator",
    "RandomBatchSampler", "TrainResult", "TrainSession", "answer_examples", "encode_examples",
    "make_trainable", "question_answer_example", "save_trained", "train",
]
