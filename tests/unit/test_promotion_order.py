"""The proposal promotes by damage per byte: what the gate needs at the fewest added bytes."""

from omni_export.profiles import ParityThreshold
from omni_export.quantize.presets import W4G32, W8
from omni_export.quantize.sensitivity import Damage, _damage_shares, _propose

GATE = ParityThreshold(0.965, 0.8, 0.2)


def _additive(cost: dict[str, float]):
    """A component whose cosine error is the sum of its 4-bit layers' costs (what the tests steer)."""
    def damage(choice):
        return Damage(1.0 - sum(c for p, c in cost.items() if choice[p].bits == 4))

    return damage


def test_a_cheap_layer_is_promoted_before_a_costlier_one_that_hurts_a_little_more():
    # The head hurts most (0.03) but its promotion adds 80 MB; each decoder linear hurts 0.02 for 1 MB.
    cost = {"lm_head": 0.03, "a": 0.02, "b": 0.02}
    step = {"lm_head": 80e6, "a": 1e6, "b": 1e6}
    damage = _additive(cost)
    mine = dict.fromkeys(cost, W4G32)
    order = sorted(cost, key=lambda p: -cost[p] / step[p])
    choice, d = _propose(mine, set(cost), order, GATE, damage, damage(mine))
    assert d.meets(GATE)  # 1 - 0.03 >= 0.965: the two linears were enough
    assert choice["lm_head"].bits == 4 and choice["a"].bits == choice["b"].bits == 8
    # Most damage first (the old order) spends the head's bytes and still needs a linear.
    worst_first = sorted(cost, key=lambda p: -cost[p])
    choice, _ = _propose(mine, set(cost), worst_first, GATE, damage, damage(mine))
    assert choice["lm_head"].bits == 8


def test_with_room_the_least_damage_per_byte_saved_is_demoted_first():
    cost = {"big": 0.01, "small": 0.01}
    step = {"big": 50e6, "small": 1e6}
    damage = _additive(cost)
    mine = dict.fromkeys(cost, W8)
    order = sorted(cost, key=lambda p: -cost[p] / step[p])
    choice, d = _propose(mine, set(cost), order, ParityThreshold(0.985, 0.8, 0.2), damage, damage(mine))
    assert choice == {"big": W4G32, "small": W8} and d.meets(ParityThreshold(0.985, 0.8, 0.2))


def test_a_block_damage_is_shared_by_its_layers_own_errors():
    alone = {"0.q": Damage(0.9, kl=0.4), "0.k": Damage(0.9, kl=0.4), "1.q": Damage(0.95, kl=0.1)}
    own = {"0.q": Damage(0.99), "0.k": Damage(0.97), "1.q": Damage(0.98)}
    block = {"0.q": "0", "0.k": "0", "1.q": "1"}
    share = _damage_shares(alone, own, block)
    assert abs(share["0.q"] - 0.1) < 1e-9 and abs(share["0.k"] - 0.3) < 1e-9 and abs(share["1.q"] - 0.1) < 1e-9
    assert _damage_shares(alone, None, block) == {"0.q": 0.4, "0.k": 0.4, "1.q": 0.1}
    # Layers whose own outputs are exact split their block's damage evenly.
    even = _damage_shares(alone, dict.fromkeys(own, Damage(1.0)), block)
    assert even["0.q"] == even["0.k"] == 0.2
