"""Scoring: shared-prompt label ranking equals the naive prompt+label scoring; metrics."""

from __future__ import annotations

import pytest
import torch

from peftbench.evaluation import shared_prompt
from peftbench.evaluation.metrics import classification_metrics, generation_metrics
from peftbench.methods import get_method
from peftbench.models import load_model
from peftbench.training.encoding import TextEncoder, collate
from peftbench.training.objective import sequence_logprobs

PROMPTS = ["Is this good? yes it is\nAnswer:", "short\nAnswer:",
           "A much longer prompt with many words to force padding here\nAnswer:"]
LABELS = ["positive", "negative", "quite neutral indeed"]


@pytest.mark.parametrize(("model_name", "method"), [
    *[(name, method) for name in ("tiny-random-llama", "tiny-random-t5")
      for method in ("lora", "bitfit", "full")],
    ("tiny-random-llama", "prompt_tuning"),  # virtual tokens in the shared cache
])
def test_shared_prompt_scores_equal_naive_scores(model_name, method):
    loaded = load_model(model_name, seed=0)
    m = get_method(method)
    model = m.apply(loaded.model, m.resolve_args({}),
                    encoder_decoder=loaded.is_encoder_decoder).eval()
    for param in model.parameters():  # make adapters non-trivial
        param.data.add_(0.02 * torch.randn_like(param))
    enc = TextEncoder(loaded.tokenizer, loaded.is_encoder_decoder, 256, 32)
    prompts = [enc.prompt_ids(p) for p in PROMPTS]
    label_ids = [enc.target_ids(label) for label in LABELS]
    pairs = [enc.encode_ids(p, ids) for p in prompts for ids in label_ids]
    with torch.no_grad():
        naive = sequence_logprobs(model, collate(pairs, enc.pad_id), loaded.is_encoder_decoder,
                                  gather=False).view(len(PROMPTS), len(LABELS))
        score = (shared_prompt.encoder_decoder_scores if loaded.is_encoder_decoder
                 else shared_prompt.decoder_scores)
        shared = score(model, prompts, label_ids, enc.pad_id, torch.device("cpu"))
    assert torch.allclose(naive, shared, atol=1e-4), (naive, shared)


def test_prompt_tuning_is_detected_as_prompt_learning():
    loaded = load_model("tiny-random-llama", seed=0)
    m = get_method("prompt_tuning")
    assert shared_prompt.is_prompt_learning(m.apply(loaded.model, m.resolve_args({}),
                                                    encoder_decoder=False))
    assert not shared_prompt.is_prompt_learning(load_model("tiny-random-llama").model)


def test_classification_metrics_known_values():
    scores = classification_metrics([1, 1, 0, 0], [1, 0, 0, 0])
    assert scores["accuracy"] == 75.0
    assert scores["mcc"] == pytest.approx(100 * 1 / 3 ** 0.5)
    assert classification_metrics([1, 1, 1], [1, 0, 1])["mcc"] == 0.0


def test_one_class_in_a_tiny_split_scores_without_a_library_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert classification_metrics([1], [1]) == {"accuracy": 100.0, "macro_f1": 100.0,
                                                     "mcc": 0.0}


def test_generation_metrics_use_the_best_reference():
    scores = generation_metrics(["the cat sat on the mat"],
                                [("a dog barked", "the cat sat on the mat")])
    assert scores["rougeL"] == pytest.approx(100.0)
    assert scores["exact_match"] == 100.0
    assert scores["bleu"] == pytest.approx(100.0)
    assert "nrefs:2" in scores["bleu_signature"]
    low = generation_metrics(["completely different words"], [("the cat sat",)])
    assert low["rougeL"] == 0.0 and low["exact_match"] == 0.0


def _soft_prompt_model():
    loaded = load_model("tiny-random-llama", seed=0)
    m = get_method("prompt_tuning")
    model = m.apply(loaded.model, m.resolve_args({"num_virtual_tokens": 4}),
                    encoder_decoder=False).eval()
    generator = torch.Generator().manual_seed(0)
    for param in model.parameters():  # a random tiny model repeats one token: vary it
        param.data.add_(0.5 * torch.randn(param.shape, generator=generator))
    enc = TextEncoder(loaded.tokenizer, False, 256, 32)
    return model, enc, [enc.prompt_ids(p) for p in PROMPTS]


def test_soft_prompt_generation_equals_step_by_step_decoding_without_cache():
    """The cached loop must give the tokens of the plain definition: at each step run the
    whole soft prompt + prompt + tokens so far through peft's forward and take the argmax."""
    from peftbench.evaluation.soft_prompt import greedy_generate

    model, enc, prompts = _soft_prompt_model()
    for prompt in prompts:
        ids = torch.tensor([prompt])
        fast = greedy_generate(model, ids, torch.ones_like(ids), 6, eos_id=-1, pad_id=enc.pad_id)
        expected = []
        with torch.no_grad():
            for _ in range(6):
                seq = torch.tensor([prompt + expected])
                logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
                expected.append(int(logits[0, -1].argmax()))
        assert fast[0].tolist() == expected


def test_soft_prompt_generation_of_a_left_padded_row_equals_the_row_alone():
    from peftbench.evaluation.soft_prompt import greedy_generate
    from peftbench.training.encoding import left_pad

    model, enc, prompts = _soft_prompt_model()
    batch = left_pad(prompts, enc.pad_id)
    together = greedy_generate(model, batch["input_ids"], batch["attention_mask"], 5,
                               eos_id=-1, pad_id=enc.pad_id)
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        alone = greedy_generate(model, ids, torch.ones_like(ids), 5, eos_id=-1,
                                pad_id=enc.pad_id)
        assert together[row].tolist() == alone[0].tolist()
