"""The exchanges of one step (hiertrain.exchanges): a pure function of the plan and the account,
asserted exactly; the three-tier runtime sends and takes these keys and no others."""


from hiertrain.exchanges import Exchange, exchanges, select
from hiertrain.plan import Stage, from_schedule
from hiertrain.schedule import Schedule

U = 7


def osl(o="cloud", s="edge", l="device", m_s=2, m_l=5, b=(20, 4, 8)):
    return Schedule(mapping={"o": o, "s": s, "l": l}, m_s=m_s, m_l=m_l, b_o=b[0], b_s=b[1], b_l=b[2])


def of(sched, account, batch=32):
    return exchanges(from_schedule(sched, units=U, batch=batch), account)


def test_hierTrain_o_s_l():
    assert of(osl(), "cloud") == (
        Exchange("take", "samples", "device", 0, ("o",)),
        Exchange("send", "weights", "edge", 2, ("s",)), Exchange("send", "weights", "device", 5, ("l",)),
        Exchange("take", "act", "edge", 2, ("s",)), Exchange("take", "act", "device", 5, ("l",)),
        Exchange("send", "grad", "edge", 2, ("s",)), Exchange("send", "grad", "device", 5, ("l",)),
        Exchange("take", "wgrad", "edge", 2, ("s",)), Exchange("take", "wgrad", "device", 5, ("l",)))
    slice_s = (Exchange("take", "weights", "cloud", 2, ("s",)), Exchange("send", "act", "cloud", 2, ("s",)),
               Exchange("take", "grad", "cloud", 2, ("s",)), Exchange("send", "wgrad", "cloud", 2, ("s",)))
    assert of(osl(), "edge") == (Exchange("take", "samples", "device", 0, ("s",)),) + slice_s
    assert of(osl(), "device") == (Exchange("send", "samples", "cloud", 0, ("o",)),
                                   Exchange("send", "samples", "edge", 0, ("s",))) + tuple(
        x._replace(peer="cloud", layer=5, groups=("l",)) for x in slice_s)  # (its own group's samples stay)


def test_a_cut_at_the_last_unit_sends_the_logits_to_o_and_an_idle_role_exchanges_nothing():
    sched = osl(o="device", s="edge", l="cloud", m_s=0, m_l=U, b=(24, 0, 8))
    assert of(sched, "cloud") == (
        Exchange("take", "samples", "device", 0, ("l",)),
        Exchange("take", "weights", "device", 7, ("l",)), Exchange("send", "act", "device", 7, ("l",)),
        Exchange("take", "grad", "device", 7, ("l",)), Exchange("send", "wgrad", "device", 7, ("l",)))
    assert of(sched, "edge") == ()
    assert [(x.op, x.kind) for x in of(sched, "device")] == [("send", "samples"), ("send", "weights"), ("take", "act"),
                                                              ("send", "grad"), ("take", "wgrad")]
    assert of(osl(o="device", s="edge", l="cloud", m_s=0, m_l=0, b=(32, 0, 0)), "device") == ()  # all on the device


def test_a_chain_passes_activations_on_and_gradients_back_and_owns_its_units():
    chain = Schedule(mapping={"o": "cloud", "s": "edge", "l": "device"}, m_s=0, m_l=0, b_o=32, b_s=0, b_l=0,
                     policy="jointdnn", chain=(Stage("device", 1, 2), Stage("edge", 3, 5), Stage("cloud", 6, 7)))
    assert of(chain, "device") == (Exchange("send", "act", "edge", 2, ("chain",)),
                                   Exchange("take", "grad", "edge", 2, ("chain",)))
    assert of(chain, "edge") == (Exchange("take", "act", "device", 2, ("chain",)), Exchange("send", "act", "cloud", 5, ("chain",)),
                                 Exchange("send", "grad", "device", 2, ("chain",)), Exchange("take", "grad", "cloud", 5, ("chain",)))
    assert of(chain, "cloud") == (Exchange("take", "act", "edge", 5, ("chain",)),
                                  Exchange("send", "grad", "edge", 5, ("chain",)))


def test_every_send_is_someone_s_take():
    for sched in (osl(), osl(o="edge", s="device", l="cloud", m_s=1, m_l=7, b=(1, 30, 1)),
                  osl(o="device", s="cloud", l="edge", m_s=3, m_l=3, b=(0, 16, 16))):
        plan = from_schedule(sched, units=U, batch=32)
        sends = {(a, x.kind, x.peer, x.layer) for a in ("device", "edge", "cloud") for x in exchanges(plan, a)
                 if x.op == "send"}
        takes = {(x.peer, x.kind, a, x.layer) for a in ("device", "edge", "cloud") for x in exchanges(plan, a)
                 if x.op == "take"}
        assert sends == takes and sends


def test_select_keys_by_group():
    assert select(of(osl(), "cloud"), "take", "act") == {"s": Exchange("take", "act", "edge", 2, ("s",)),
                                                         "l": Exchange("take", "act", "device", 5, ("l",))}


def test_a_fleets_messages_pass_through_the_edge_and_a_cut_reaches_the_cloud_in_one_message():
    """What a fleet's services send and take (edge/coordinator.py, device/worker.py, cloud/worker.py):
    members pi1 and pi2 cut at 5 reach the cloud in one message; pi3's raw samples are relayed to it;
    pi4 trains alone; the edge trains all of pi5's samples."""
    from hiertrain.plan import for_fleet

    plan = for_fleet([("pi1", 4, 2, 5), ("pi2", 3, 1, 5), ("pi3", 2, 0, 0), ("pi4", 3, U, U), ("pi5", 2, 0, U)],
                     units=U)
    cut = ("pi1", "pi2")
    assert exchanges(plan, "cloud") == (
        Exchange("take", "samples", "edge", 0, ("pi3",)), Exchange("take", "weights", "edge", 7, cut + ("pi3",)),
        Exchange("take", "act", "edge", 5, cut), Exchange("send", "grad", "edge", 5, cut),
        Exchange("send", "wgrad", "edge", 7, cut + ("pi3",)))
    assert exchanges(plan, "pi1") == (
        Exchange("take", "weights", "edge", 2, ("pi1",)), Exchange("send", "act", "edge", 2, ("pi1",)),
        Exchange("take", "grad", "edge", 2, ("pi1",)), Exchange("send", "wgrad", "edge", 2, ("pi1",)))
    assert exchanges(plan, "pi3") == (Exchange("send", "samples", "edge", 0, ("pi3",)),)
    assert exchanges(plan, "pi4") == (Exchange("take", "weights", "edge", 7, ("pi4",)),
                                      Exchange("send", "wgrad", "edge", 7, ("pi4",)))
    assert [(x.op, x.kind, x.peer, x.layer) for x in exchanges(plan, "edge")] == [
        ("take", "samples", "pi3", 0), ("send", "samples", "cloud", 0), ("take", "samples", "pi5", 0),
        ("send", "weights", "pi1", 2), ("send", "weights", "cloud", 7), ("send", "weights", "pi2", 1),
        ("send", "weights", "pi4", 7),
        ("take", "act", "pi1", 2), ("send", "act", "cloud", 5), ("take", "act", "pi2", 1),
        ("send", "grad", "pi1", 2), ("take", "grad", "cloud", 5), ("send", "grad", "pi2", 1),
        ("take", "wgrad", "pi1", 2), ("take", "wgrad", "cloud", 7), ("take", "wgrad", "pi2", 1),
        ("take", "wgrad", "pi4", 7)]
    accounts = ("edge", "cloud", "pi1", "pi2", "pi3", "pi4", "pi5")
    sends = {(a, x.kind, x.peer, x.layer) for a in accounts for x in exchanges(plan, a) if x.op == "send"}
    takes = {(x.peer, x.kind, a, x.layer) for a in accounts for x in exchanges(plan, a) if x.op == "take"}
    assert sends == takes
