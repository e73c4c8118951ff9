import torch

from fedpt.proxy.fusion import DYNAMIC_ALPHAS, Fusion, kl

torch.manual_seed(0)
L, B, T = (torch.randn(2, 3, 11) * 2 for _ in range(3))


def test_fixed_fusions_by_hand():
    torch.testing.assert_close(Fusion(alpha=0.5)(L, B, T), torch.log_softmax(L + 0.5 * (T - B), -1))
    torch.testing.assert_close(Fusion(weight=1.0)(L, B, T), torch.log_softmax(T, -1))
    proxy = torch.log_softmax(L + (T - B), -1)
    torch.testing.assert_close(Fusion(weight=0.25)(L, B, T), torch.log_softmax(0.75 * proxy + 0.25 * T, -1))
    assert Fusion(alpha=1.5, weight=0.5).label == "alpha=1.5, w=0.5" and Fusion(dynamic=True).label == "dynamic alpha"


def test_dynamic_alpha_matches_the_small_models_shift():
    got = Fusion(dynamic=True)(L, B, T)
    large = torch.log_softmax(L, -1)
    target = kl(torch.log_softmax(T, -1), torch.log_softmax(B, -1))
    for pos in range(2):
        for t in range(3):
            gaps = [abs(kl(torch.log_softmax(L[pos, t] + a * (T[pos, t] - B[pos, t]), -1), large[pos, t])
                        - target[pos, t]) for a in DYNAMIC_ALPHAS]
            best = DYNAMIC_ALPHAS[min(range(len(gaps)), key=gaps.__getitem__)]
            torch.testing.assert_close(got[pos, t], torch.log_softmax(L[pos, t] + best * (T[pos, t] - B[pos, t]), -1))
    # no shift in the small pair: no shift in the large model
    torch.testing.assert_close(Fusion(dynamic=True)(L, B, B), torch.log_softmax(L, -1))
