"""The context head: it reads each completion position with only what precedes it, whatever the batch, and the
training path (cached prompt + prefix features) gives the f the export scores."""

import pytest
import torch

from pipeline.importance.context_head import ContextHead, token_features
from pipeline.importance.model import FeatureCache, ImportanceModule, ImportanceNet, NetConfig
from pipeline.importance.states import context_features

PROMPTS = [[5, 6, 7, 1, 90], [9, 1, 90], [11, 12, 13, 14, 15, 16, 1, 90]]
COMPLETIONS = [[60, 61, 250, 70], [62], [80, 81, 82, 83, 84, 85, 86]]


def _random(module: torch.nn.Module, seed: int = 0) -> None:
    """Random trainable weights (not the constant start), so that f varies along the completion."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=generator))


@pytest.fixture(scope="module")
def net(tiny_model_dir):
    net = ImportanceNet(NetConfig(str(tiny_model_dir), features="context"))
    _random(net.head)
    return net.eval()


def test_context_features_are_a_plain_forward_of_each_row(net):
    """Each distinct prompt is forwarded once and its cache shared (here by rows 0, 2 and 3, one with no
    completion token): every row still equals a plain forward of its prompt + completion."""
    prompts, completions = [*PROMPTS, PROMPTS[0]], [*COMPLETIONS, []]
    prompts[2] = PROMPTS[0]
    features, lengths, prompt_lengths = context_features(net.body, prompts, completions, "cpu")
    assert lengths.tolist() == [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    assert prompt_lengths.tolist() == [len(p) for p in prompts]
    for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            hidden = net.body(input_ids=ids).last_hidden_state
        alone = token_features(hidden, net.body.get_input_embeddings()(ids))
        assert torch.allclose(features[row, : lengths[row]], alone[0], atol=1e-5)
        assert (features[row, lengths[row]:] == 0).all()


def test_a_position_reads_nothing_after_it():
    """a(u) is the same whatever follows prompt + completion[:u], and batching with longer rows changes nothing."""
    torch.manual_seed(0)
    head = ContextHead(6, head_hidden=8)
    _random(head)
    x = torch.randn(2, 9, 6)
    lengths, prompt_lengths = torch.tensor([9, 9]), torch.tensor([3, 3])
    later = x.clone()
    later[1, 6:] = torch.randn(3, 6)  # row 1's completion tokens 3..: a(u) reads token u - 1, so a(4) on sees them
    a = head(x, lengths, prompt_lengths, 6)
    b = head(later, lengths, prompt_lengths, 6)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1, :3], b[1, :3], atol=1e-6)
    assert not torch.allclose(a[1, 3:], b[1, 3:])
    short = head(x[:1, :5], torch.tensor([5]), prompt_lengths[:1], 2)
    padded = head(torch.cat([x[:1, :5], torch.randn(1, 4, 6)], 1), torch.tensor([5]), prompt_lengths[:1], 2)
    assert torch.allclose(short, padded, atol=1e-6) and torch.allclose(short, a[:1, :2], atol=1e-6)


def test_training_reads_the_f_the_export_scores(net):
    """pair_f on cached prompt + prefix rows equals the curve of the whole completion at each split."""
    module = ImportanceModule({**net.config.to_dict(), "backbone": net.config.backbone}, "gaussian", 0.1, 0.3,
                              lr=1e-3, backbone_lr=0.0, weight_decay=0.0, feature_cache=FeatureCache("context"))
    module.net.head.load_state_dict(net.head.state_dict())
    module.eval()
    splits = [2, 0, 5]
    batch = {"prompt": PROMPTS, "prefix": [c[:t] for c, t in zip(COMPLETIONS, splits, strict=True)],
             "split": torch.tensor(splits), "index": torch.tensor([0, 1, 2])}
    with torch.no_grad():
        f = module.pair_f(batch)
        again = module.pair_f(batch)  # read from the cache
        whole = net.curve(PROMPTS, COMPLETIONS)
    expected = torch.tensor([whole[i, t].item() if t else 0.0 for i, t in enumerate(splits)])
    assert torch.allclose(f, expected, atol=1e-5) and torch.equal(f, again) and module.features_computed == 3


def test_a_context_run_refuses_another_kind_of_cache(net):
    with pytest.raises(ValueError, match="cannot serve"):
        ImportanceModule(net.config.to_dict(), "gaussian", 0.1, 0.3, lr=1e-3, backbone_lr=0.0, weight_decay=0.0,
                         feature_cache=FeatureCache("all"))


def test_the_online_head_runs_a_context_export_as_stage_2_scores_it(net, tiny_model_dir, tmp_path):
    """Warm-started from a context export, stage 3's online head reads the context inputs of the policy's own
    log-prob forward (left-padded rows) and gives the f stage 2's net scores on the same weights."""
    from transformers import AutoModelForCausalLM

    from pipeline.dump import tokenizer_fingerprint
    from pipeline.grpo.logprobs import completion_outputs
    from pipeline.grpo.online_importance import OnlineImportance, OnlineOptions, warm_start
    from pipeline.grpo.rollout import pad_batch
    from pipeline.importance.export import save_export
    from pipeline.models import load_tokenizer

    fingerprint = tokenizer_fingerprint(load_tokenizer(str(tiny_model_dir)))
    export = save_export(net, tmp_path / "export", tokenizer=fingerprint, reward_key="reward", group_stats="prompt",
                         likelihood="gaussian", baseline_f=0.3)
    hidden_size = net.body.config.hidden_size
    online = OnlineImportance(hidden_size, OnlineOptions(), "cpu", *warm_start(export, hidden_size, fingerprint))
    assert online.state_kind == "context" and online.head.row_width == 2 * hidden_size
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    input_ids, attention, mask = pad_batch(PROMPTS, COMPLETIONS, pad_id=0)
    with torch.no_grad():
        _, _, inputs = completion_outputs(policy, input_ids, attention, mask.shape[1], states="context")
        expected, lengths, prompt_lengths = context_features(net.body, PROMPTS, COMPLETIONS, "cpu")
        online_f = online.head.curve(inputs, mask.sum(1).long(), mask.shape[1])
        stage2_f = net.curve(PROMPTS, COMPLETIONS)
    assert torch.equal(inputs.lengths, lengths) and torch.equal(inputs.prompt_lengths, prompt_lengths)
    torch.testing.assert_close(inputs.features[:, : expected.shape[1]], expected, rtol=0, atol=1e-5)
    assert (inputs.features[:, expected.shape[1]:] == 0).all()
    torch.testing.assert_close(online_f, stage2_f, rtol=0, atol=1e-5)
    assert float((stage2_f[:, 1:] - stage2_f[:, :-1]).abs().max()) > 0.01  # a curve that varies: the check has teeth
