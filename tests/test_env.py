"""Environment semantics: grid geometry, reward, action masking, termination, batching."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import toy_data
from gymnasium.utils.env_checker import check_env
from segment_anything.utils.transforms import ResizeLongestSide

from alignsam_ray.agent.srm import SRM
from alignsam_ray.env import AlignSamEnv, AlignSamVectorEnv, PatchGrid, PromptEpisodes


def test_grid_paper_default_and_config():
    assert PatchGrid.from_config() == PatchGrid(10, 10)  # 800 / 80
    assert PatchGrid.from_config(patch_size=50).n == 256  # 16 x 16
    assert PatchGrid.from_config(grid=[8, 12]).n == 96
    with pytest.raises(ValueError):
        PatchGrid.from_config(patch_size=70)  # does not divide 800


def test_grid_centres_non_square_image():
    g = PatchGrid(10, 10)
    h, w = 300, 600
    xy = g.centres_original((h, w))
    assert np.allclose(xy[0], [30, 15]) and np.allclose(xy[99], [570, 285])  # patches are 60 x 30 px
    assert np.allclose(xy[12], [(2 + 0.5) * 60, (1 + 0.5) * 30])  # row-major: action 12 = row 1, col 2
    expect = ResizeLongestSide(1024).apply_coords(xy, (h, w))  # exactly what SamPredictor does
    assert np.allclose(g.centres_sam((h, w)), expect)
    assert g.centres_sam((h, w))[:, 1].max() < 1024 * h / w  # inside the image part of the frame
    u, v = g.centres_normalised().T
    assert (g.cell_of(u, v) == np.arange(100)).all()


def _episodes(decoder, labels="gt", horizon=4, slots=1, sizes=((300, 600), (500, 250)), **kw):
    data = toy_data(sizes)
    return PromptEpisodes(data=data, decoder=decoder, grid=PatchGrid(10, 10), num_slots=slots, horizon=horizon,
                          obs_res=8, init=kw.pop("init", "gt"), labels=labels, state=kw.pop("state", "probability"),
                          srm=kw.pop("srm", SRM(64)), seed=kw.pop("seed", 0), **kw)


def test_reward_hit_label_and_void(micro_decoder):
    ep = _episodes(micro_decoder)
    ep.reset([0], [0])  # ground truth: left half foreground, a void band on top
    r = ep.step([55])  # row 5, col 5: just right of the middle -> background
    assert r.reward[0] == -1 and not r.hit[0] and r.label[0] == 0
    r = ep.step([54])  # col 4: left half -> foreground
    assert r.reward[0] == 1 and r.hit[0] and r.label[0] == 1  # oracle labels follow the ground truth
    r = ep.step([2])  # row 0 lies in the void band: neither reward nor penalty
    assert r.reward[0] == 0 and not r.hit[0]
    assert 0.0 <= r.iou[0] <= 1.0
    # the picked points are stored in SAM's frame with their labels
    assert np.allclose(ep.coords[0, 2], PatchGrid(10, 10).centres_sam((300, 600))[55])
    assert ep.labels[0, :5].tolist() == [1, 0, 0, 1, 0]


def test_action_mask_and_termination(micro_decoder):
    ep = _episodes(micro_decoder, horizon=3)
    ep.reset([0], [1])
    ep.step([7])
    assert ep.action_mask()[0, 7] == 0 and ep.action_mask()[0].sum() == 99
    with pytest.raises(ValueError, match="already picked"):
        ep.step([7])
    assert not ep.step([8]).terminated[0]
    assert ep.step([9]).terminated[0]
    with pytest.raises(RuntimeError, match="finished episode"):
        ep.step([10])


def test_positive_labels_ablation(micro_decoder):
    ep = _episodes(micro_decoder, labels="positive")
    ep.reset([0], [0])
    assert ep.step([55]).label[0] == 1  # background point, labelled positive anyway


def test_batched_slots_equal_single_slots(micro_decoder):
    """k slots in one decoder call give what k separate episodes give."""
    batched = _episodes(micro_decoder, slots=2)
    batched.reset([0, 1], [0, 1])
    singles = [_episodes(micro_decoder) for _ in range(2)]
    for k, s in enumerate(singles):
        s.reset([0], [k])
        s.coords[0, :2] = batched.coords[k, :2]  # same random start points
        s._decode(np.array([0]))
        s._observe(np.array([0]))
    for actions in ([11, 64], [33, 20]):
        rb = batched.step(actions)
        for k, s in enumerate(singles):
            r = s.step([actions[k]])
            assert r.reward[0] == rb.reward[k]
            np.testing.assert_allclose(s.logits[0], batched.logits[k], atol=1e-4)
            np.testing.assert_allclose(s.obs[0].astype(np.float32), batched.obs[k].astype(np.float32), atol=1e-2)


def test_observation_is_masked_embedding(micro_decoder):
    ep = _episodes(micro_decoder)
    ep.reset([0], [0])
    ep.prob[0] = 0
    ep._observe(np.array([0]))
    assert not ep.obs[0].any()  # empty previous map -> zero state
    ep.prob[0] = 1
    ep._observe(np.array([0]))
    assert ep.obs.dtype == np.float16 and ep.obs[0].any()


def _expected_obs(ep, m256: np.ndarray) -> np.ndarray:
    """E_I(x) (.) M by hand: M (256, 256) averaged to the 64 grid, image area cropped, pooled to R."""
    import torch
    import torch.nn.functional as F

    emb = torch.from_numpy(ep.data["embeddings"][0].astype(np.float32))
    m64 = F.avg_pool2d(torch.from_numpy(m256.astype(np.float32))[None], 4)
    h, w = ep._cells64[0]
    return F.adaptive_avg_pool2d((emb * m64)[:, :h, :w], ep.obs_res).numpy()


def test_state_is_sams_probability_map_by_default(micro_decoder):
    """Paper Sec. 3.3 / Eq. 11: s_t = E_I(x) (.) sigmoid(SAM's low-res logits); the binary option
    multiplies by the thresholded mask. They differ (the probability map keeps features outside the mask)."""
    import torch

    prob, binary = _episodes(micro_decoder), _episodes(micro_decoder, state="binary")
    for ep in (prob, binary):
        ep.reset([0], [0])
        ep.step([54])
    np.testing.assert_array_equal(prob.logits, binary.logits)  # same prompts, same SAM output
    p = torch.sigmoid(torch.from_numpy(prob.logits[0])).numpy()
    assert 0.01 < p.mean() < 0.99 and ((p > 0.02) & (p < 0.98)).any()  # a real probability map
    np.testing.assert_allclose(prob.obs[0].astype(np.float32), _expected_obs(prob, p), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(binary.obs[0].astype(np.float32), _expected_obs(binary, binary.logits[0] > 0),
                               rtol=2e-3, atol=2e-3)
    assert np.abs(prob.obs[0].astype(np.float32) - binary.obs[0].astype(np.float32)).max() > 1e-2
    with pytest.raises(ValueError, match="state must be one of"):
        _episodes(micro_decoder, state="soft")


def test_centre_start_without_srm(micro_decoder):
    """w/o SRM: one positive point at the image centre, no negative point, no SRM at all."""
    ep = _episodes(micro_decoder, labels="positive", init="centre", srm=None, horizon=3)
    ep.reset([0], [0])  # a 300 x 600 image: centre (300, 150) -> SAM frame (512, 256)
    coords, labels = ep.points(0)
    np.testing.assert_allclose(coords, [[512, 256]])
    assert labels.tolist() == [1]
    ep.step([55])
    coords, labels = ep.points(0)
    assert len(coords) == 2 and labels.tolist() == [1, 1]
    with pytest.raises(ValueError, match="needs an SRM"):
        _episodes(micro_decoder, labels="srm", init="centre", srm=None)


def test_srm_scores_and_step_fraction(micro_decoder):
    ep = _episodes(micro_decoder, horizon=4)
    ep.reset([0], [0])
    ep.srm_prob[0] = 0
    r, c = ep._centre_cells[37]
    ep.srm_prob[0, r, c] = 0.9  # the SRM likes patch 37 (row 3, col 7) best
    scores = ep.srm_scores()
    assert scores.shape == (1, 100) and scores[0, 37] == np.float32(0.9)
    same_cell = (ep._centre_cells == (r, c)).all(1)  # R = 8 < 10 patches: patches can share a cell
    assert (scores[0] == np.float32(0.9)).tolist() == same_cell.tolist()
    assert ep.step_fraction().tolist() == [[0.0]]
    ep.step([37])
    assert ep.step_fraction().tolist() == [[0.25]]


def test_holdout_pool_keeps_validation_images_out_of_training(micro_decoder):
    from alignsam_ray.env.episodes import holdout_split

    train, val = holdout_split(10, 3)
    assert train.tolist() == list(range(7)) and val.tolist() == [7, 8, 9]
    with pytest.raises(ValueError, match="holdout"):
        holdout_split(5, 5)
    ep = _episodes(micro_decoder, slots=4, sizes=((300, 600), (500, 250), (400, 400)), pool=[0, 2])
    for _ in range(10):
        ep.reset(np.arange(4))
        assert set(ep.image.tolist()) <= {0, 2}


def test_gym_env_passes_checker_and_reads_store(blur_store):
    env = AlignSamEnv({"store": blur_store, "horizon": 5, "obs_res": 8, "seed": 0})
    check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=1)
    assert obs["obs"].shape == (64, 8, 8) and obs["action_mask"].shape == (100,) and obs["step"].tolist() == [0.0]
    total, done = 0, False
    while not done:
        action = int(np.flatnonzero(obs["action_mask"])[0])
        obs, reward, done, truncated, info = env.step(action)
        assert reward in (-1.0, 0.0, 1.0) and not truncated
        total += 1
    assert total == 5 and info["step"] == 5 and {"iou", "hit", "label"} <= set(info)
    assert obs["step"].tolist() == [1.0]  # t / T: the critic knows the episode is over


def test_vector_env_autoresets_next_step(blur_store):
    env = AlignSamVectorEnv({"store": blur_store, "horizon": 2, "obs_res": 8, "seed": 0}, num_envs=3)
    obs, _ = env.reset(seed=0)
    assert obs["obs"].shape == (3, 64, 8, 8)
    for _ in range(2):
        obs, rew, term, trunc, info = env.step(obs["action_mask"].argmax(1))
    assert term.all()
    obs, rew, term, trunc, info = env.step(np.zeros(3, int))  # NEXT_STEP autoreset: fresh episodes
    assert (rew == 0).all() and not term.any() and (info["step"] == 0).all()
    assert (obs["action_mask"] == 1).all()


def test_vector_env_makes_one_decoder_call_per_step(blur_store):
    """k slots share one batched SAM decoder call per vector step (the fast path of issue 6)."""
    env = AlignSamVectorEnv({"store": blur_store, "horizon": 4, "obs_res": 8, "seed": 0}, num_envs=4)
    obs, _ = env.reset(seed=0)
    decoder, calls = env.episodes.decoder, []
    inner = decoder.decode
    decoder.decode = lambda emb, *a, **k: calls.append(len(emb)) or inner(emb, *a, **k)
    for _ in range(4):
        obs, *_ = env.step(obs["action_mask"].argmax(1))
    assert calls == [4, 4, 4, 4]  # one call per step, all four slots in it


def test_explicit_branch_needs_text_map(blur_store):
    with pytest.raises(KeyError, match="no per-image map"):
        AlignSamEnv({"store": blur_store, "srm_branch": "explicit", "text_map": "clip"})


def test_explicit_branch_reads_the_text_map(micro_decoder):
    """The explicit SRM gets s_c = E (.) M_c from the store's map column; samples carry it."""
    data = toy_data()
    data["map_clip"] = np.zeros((2, 64, 64), np.float16)
    data["map_clip"][:, :, :32] = 1  # the "text" points at the left half
    srm = SRM(64, "explicit")
    ep = PromptEpisodes(data=data, decoder=micro_decoder, grid=PatchGrid(10, 10), num_slots=1, horizon=3, obs_res=8,
                        init="srm", labels="srm", state="probability", srm=srm, text_map="clip", seed=0)
    ep.collect_srm_samples = True
    ep.reset([0], [0])
    ep.step([44])
    samples = ep.pop_srm_samples()
    assert len(samples) == 3  # s_0 at reset, after reset, after the step
    s_t, s_c, target = samples[-1]
    assert s_c is not None and s_c.shape == s_t.shape == (64, 8, 8) and target.shape == (8, 8)
    assert np.abs(s_c[:, :, 6:]).max() == 0  # M_c = 0 on the right: nothing there
    assert ep.pop_srm_samples() == []


def test_srm_weights_in_and_samples_out_of_an_env_runner(blur_store):
    """What AlignSamPPO does on each EnvRunner (vector env or single): load the run's SRM weights into
    every env (``set_srm_weights``; a restarted runner's env starts with a random SRM) and take the
    samples they collected (``pop_srm_samples``)."""
    from types import SimpleNamespace

    import torch

    from alignsam_ray.env.alignsam_env import AlignSamVectorEnv, pop_srm_samples, set_srm_weights

    torch.manual_seed(123)
    weights = {k: v.numpy() for k, v in SRM(64).state_dict().items()}
    runner = SimpleNamespace(env=AlignSamVectorEnv({"store": blur_store, "obs_res": 8, "horizon": 3,
                                                    "collect_srm_samples": True}, num_envs=2))
    assert any(not np.array_equal(v.numpy(), weights[k]) for k, v in runner.env.episodes.srm.state_dict().items())
    assert set_srm_weights(runner, weights) == 1
    for k, v in runner.env.episodes.srm.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), weights[k])
    runner.env.reset(seed=0)
    runner.env.step(np.zeros(2, np.int64))
    samples = pop_srm_samples(runner)
    assert len(samples) == 6 and samples[0][0].shape == (64, 8, 8)  # 2 slots x (s_0, after reset, after the step)
    assert pop_srm_samples(runner) == []


def _iou_by_hand(ep, s: int) -> float:
    """IoU of slot s's binary low-res mask with its ground truth: inside the image, void excluded."""
    i = ep.image[s]
    h, w = ep._px256[i]
    gt, pred = ep.data["gt_lowres"][i][:h, :w], ep.logits[s, :h, :w] > 0
    valid = gt != 255
    return float((pred & (gt == 1))[valid].sum() / max((pred | (gt == 1))[valid].sum(), 1))


def _random_episode(decoder, reward, steps=4, **kw):
    """Two slots, the training start (seed 3), the same random free patches each call -> (episodes, IoU_0,
    [StepResult per step])."""
    import torch

    torch.manual_seed(0)  # the same SRM (its labels) in every call
    kw.update({"reward": reward} if reward else {})
    ep = _episodes(decoder, labels="srm", horizon=steps, slots=2, seed=3, srm=SRM(64), **kw)
    ep.reset([0, 1])
    iou0 = ep.iou.copy()
    rng, results = np.random.default_rng(5), []
    for _ in range(steps):
        results.append(ep.step(np.array([rng.choice(np.flatnonzero(m)) for m in ep.action_mask()])))
    return ep, iou0, results


def test_hit_reward_is_the_default_and_unchanged(micro_decoder):
    """The paper's reward (the default): the same rewards as before env.reward existed (recorded with that
    code for this seed), and the reward option does not change what happens in the episode."""
    default, _, rd = _random_episode(micro_decoder, None)
    assert default.image.tolist() == [1, 0]
    assert [r.reward.tolist() for r in rd] == [[-1, 1], [0, -1], [-1, 1], [1, -1]]
    gain, _, rg = _random_episode(micro_decoder, "iou_gain")
    np.testing.assert_array_equal(default.logits, gain.logits)  # same points, same labels, same masks
    for a, b in zip(rd, rg):
        assert a.iou.tolist() == b.iou.tolist() and a.label.tolist() == b.label.tolist()
    with pytest.raises(ValueError, match="reward must be one of"):
        _episodes(micro_decoder, reward="dice")


def test_iou_gain_reward_is_the_change_in_iou(micro_decoder):
    """iou_gain: r_t = IoU_t - IoU_{t-1} of SAM's mask (recomputed here from its logits), IoU_0 = the mask of
    the starting points; an episode returns IoU_T - IoU_0. iou_gain_hit: hit + w (IoU_t - IoU_{t-1})."""
    ep = _episodes(micro_decoder, horizon=4, reward="iou_gain")
    ep.reset([0], [0])  # ground truth: left half foreground (a void band on top)
    before = iou0 = _iou_by_hand(ep, 0)  # IoU_0: the mask of the two start points
    assert ep.iou[0] == pytest.approx(before)
    rewards = []
    for action in (54, 44, 55, 64):  # foreground, foreground, background, foreground
        r = ep.step([action])
        after = _iou_by_hand(ep, 0)
        assert r.reward[0] == pytest.approx(after - before, abs=1e-6) and r.iou[0] == pytest.approx(after)
        rewards.append(r.reward[0])
        before = after
    assert any(abs(x) > 1e-3 for x in rewards)  # the clicks changed the mask
    assert sum(rewards) == pytest.approx(before - iou0, abs=1e-5)
    hit_only, iou0, rh = _random_episode(micro_decoder, "hit")
    mixed, _, rm = _random_episode(micro_decoder, "iou_gain_hit", iou_gain_weight=2.5)
    previous = iou0
    for h, m in zip(rh, rm):
        np.testing.assert_allclose(m.reward, h.reward + 2.5 * (m.iou - previous), atol=1e-6)
        previous = m.iou
    assert mixed.iou_gain_weight == 2.5 and hit_only.iou_gain_weight == 10  # the default w (config.EnvSettings)


def test_rewards_without_ground_truth_are_zero(micro_decoder):
    data = toy_data()
    del data["gt_lowres"]
    ep = PromptEpisodes(data=data, decoder=micro_decoder, grid=PatchGrid(10, 10), num_slots=1, horizon=2, obs_res=8,
                        init="srm", labels="srm", state="probability", srm=SRM(64), seed=0, reward="iou_gain_hit")
    ep.reset([0], [0])
    assert ep.step([54]).reward.tolist() == [0.0]


class _FixedOrderAgent:
    """What a rollout needs from an agent (env/rollout.py): a fixed SRM, the grid, a run config, and a
    deterministic stand-in policy (the free patch first in a fixed random order)."""

    def __init__(self):
        import torch

        from alignsam_ray.config import EnvSettings, RunConfig

        torch.manual_seed(0)
        self.srm, self.grid = SRM(64), PatchGrid(10, 10)
        self.cfg = RunConfig(env=EnvSettings(obs_res=8))
        self.order = np.random.default_rng(0).permutation(self.grid.n) + 1.0

    def greedy(self, obs, action_mask):
        return np.argmax(action_mask * self.order, axis=1)


def test_srm_start_positive_keeps_the_srm_start_and_labels_every_click_positive(micro_decoder):
    """The evaluation method that separates the SRM's two roles: its start points (as alignsam), then every
    later click labelled positive (as all_positive, which starts from the image centre instead)."""
    from alignsam_ray.env.rollout import rollout
    from alignsam_ray.eval_shard import METHODS

    agent, data, T = _FixedOrderAgent(), toy_data(), 4
    actions, init, labels, horizon = METHODS["srm_start_positive"]
    assert (actions, init, labels, horizon) == ("policy", "srm", "positive", None)
    start_positive = rollout(agent, data, micro_decoder, actions=actions, init=init, labels=labels, horizon=T,
                             record=(0, T))
    m = METHODS["alignsam"]
    alignsam = rollout(agent, data, micro_decoder, actions=m.actions, init=m.init, labels=m.labels, horizon=T,
                       record=(0, T))
    for k in range(len(data["ids"])):
        (c0, l0), (a0, al0) = start_positive.points[0][k], alignsam.points[0][k]
        np.testing.assert_array_equal(c0, a0)  # the SRM's highest- and lowest-scoring positions
        assert l0.tolist() == al0.tolist() == [1, 0]
        coords, point_labels = start_positive.points[T][k]
        np.testing.assert_array_equal(coords[:2], c0)
        assert point_labels.tolist() == [1, 0] + [1] * T  # every later click positive
    assert (start_positive.label_ok == start_positive.hits).all()  # all labels 1: right exactly on hits
    assert start_positive.hits.any() and not start_positive.hits.all()  # clicks on both: background ones too
