import torch

from flowcache.df_schedule import timestep_matrix
from flowcache.schedulers import flow_sigmas


def test_skyreels_async_schedule_70_iterations_lag_5():
    _, ts = flow_sigmas(50, 8.0)
    sc = timestep_matrix(5, ts, ar_step=5)
    assert sc.iterations == 70
    # every block takes exactly 50 updates
    assert sc.update_mask.sum(0).tolist() == [50] * 5
    first = [int(sc.update_mask[:, b].float().argmax()) for b in range(5)]
    assert first == [0, 5, 10, 15, 20]
    # while both run, block b's counter lags block b-1's by exactly ar_step
    for it in range(70):
        c = sc.counters[it]
        for b in range(1, 5):
            if 0 < c[b] <= 50 and c[b - 1] < 50:
                assert c[b - 1] - c[b] == 5
    # fed timesteps: pure noise (999) before start, the schedule while active, 0 when done
    assert sc.timesteps[0].tolist()[1:] == [999.0] * 4
    assert sc.timesteps[0, 0] == ts[0]
    assert sc.timesteps[-1, :4].tolist() == [0.0] * 4


def test_synchronous_and_prefix():
    _, ts = flow_sigmas(10, 5.0)
    sync = timestep_matrix(4, ts, ar_step=0)
    assert sync.iterations == 10 and bool(sync.update_mask.all())
    pre = timestep_matrix(5, ts, ar_step=2, prefix_blocks=1)
    assert not bool(pre.update_mask[:, 0].any())
    assert pre.update_mask[:, 1:].sum(0).tolist() == [10] * 4
    assert (pre.timesteps[:, 0] == 0).all()


def test_sigmas_match_skyreels():
    sig, ts = flow_sigmas(50, 8.0)
    assert len(sig) == 51 and sig[-1] == 0.0 and ts[0] == 999
    base = torch.linspace(0.999, 0, 51, dtype=torch.float64)[:-1]
    assert abs(sig[10] - float(8 * base[10] / (1 + 7 * base[10]))) < 1e-6
