"""NCCL_P2P_DISABLE is set exactly when some pair of the host's GPUs lacks peer access and the
user has not decided; the peer-access query is injected, so no GPU is needed."""

import logging

from mmtrain.engine.gpu_env import P2P_ENV, configure_p2p, pairs_without_peer_access


def _topology(blocked):
    """Peer-access query of a host where the ordered pairs in `blocked` lack access."""
    asked = []

    def can_access_peer(a, b):
        asked.append((a, b))
        return (a, b) not in blocked

    return can_access_peer, asked


def test_full_peer_access_leaves_nccl_alone():
    query, asked = _topology(set())
    env = {}
    assert configure_p2p(4, query, env) is None
    assert P2P_ENV not in env
    assert len(asked) == 4 * 3  # every ordered pair was checked


def test_one_missing_direction_disables_p2p_and_says_why(caplog):
    query, _ = _topology({(2, 1)})
    env = {}
    with caplog.at_level(logging.WARNING, logger="mmtrain"):
        message = configure_p2p(4, query, env)
    assert env[P2P_ENV] == "1"
    assert "2->1" in message and "RTX 4090" in message and P2P_ENV in message
    assert message in caplog.text


def test_user_setting_wins_and_gpu_is_not_probed():
    query, asked = _topology({(0, 1), (1, 0)})
    env = {P2P_ENV: "0"}
    assert configure_p2p(2, query, env) is None
    assert env[P2P_ENV] == "0" and asked == []


def test_single_gpu_or_cpu_host_is_untouched():
    query, asked = _topology({(0, 1)})
    for num_gpus in (0, 1):
        env = {}
        assert configure_p2p(num_gpus, query, env) is None
        assert env == {} and asked == []


def test_other_local_ranks_set_it_silently():
    query, _ = _topology({(0, 1)})
    env = {"LOCAL_RANK": "1"}
    assert configure_p2p(2, query, env) is None
    assert env[P2P_ENV] == "1"


def test_pairs_are_reported_in_both_directions():
    query, _ = _topology({(0, 3), (3, 0), (1, 2)})
    assert pairs_without_peer_access(4, query) == [(0, 3), (1, 2), (3, 0)]
