// Unit test of encoding_math.h (plain C++, no torch): rotation, transpose, tables, ALiBi, TAPA.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "fused_posenc/encoding_math.h"

using namespace fused_posenc;

static int failures = 0;
#define EXPECT_NEAR(a, b, tol)                                                                            \
  do {                                                                                                    \
    double _a = (a), _b = (b);                                                                            \
    if (!(std::fabs(_a - _b) <= (tol))) {                                                                 \
      std::printf("FAIL %s:%d: %s = %.12g, expected %.12g\n", __FILE__, __LINE__, #a, _a, _b);          \
      ++failures;                                                                                         \
    }                                                                                                     \
  } while (0)

int main() {
  // exact angles: frequencies as 128-bit turn fractions (hi, lo); 1/8 turn is exactly 2^125, 1/3 turn rounds to
  // 0x5555...5 in both words. The angle is 2 pi frac(pos * f) in [-pi, pi), exact at any position.
  const double pi = 3.14159265358979323846;
  const int64_t eighth[2] = {int64_t(1) << 61, 0};
  const int64_t third[2] = {0x5555555555555555LL, 0x5555555555555555LL};
  EXPECT_NEAR(turn_angle(0, eighth), 0.0, 0);
  EXPECT_NEAR(turn_angle(7, eighth), -pi / 4, 1e-15);             // 7/8 turn = -1/8
  EXPECT_NEAR(turn_angle(-7, eighth), pi / 4, 1e-15);
  EXPECT_NEAR(turn_angle((int64_t(1) << 61) + 3, eighth), 3 * pi / 4, 1e-15);  // 2^58 whole turns + 3/8
  EXPECT_NEAR(turn_angle(-(int64_t(1) << 61) - 3, eighth), -3 * pi / 4, 1e-15);
  EXPECT_NEAR(turn_angle(1000000000001LL, third), -2 * pi / 3, 1e-13);  // (10^12 + 1) / 3 = ... + 2/3 turn
  EXPECT_NEAR(turn_angle(4000000000000000001LL, third), -2 * pi / 3, 1e-12);
  EXPECT_NEAR(mulhi_u64(~uint64_t(0), ~uint64_t(0)), 18446744073709551614.0, 0);  // (2^64 - 1)^2 >> 64
  // rotary: the exact angle, cos/sin times scale
  float c, s;
  rotary_cos_sin<float>(7, eighth, 2.f, c, s);
  EXPECT_NEAR(c, 2.0 * std::cos(-pi / 4), 1e-6);
  EXPECT_NEAR(s, 2.0 * std::sin(-pi / 4), 1e-6);
  // rotation then transpose is the identity for a unit (c, s)
  double y1, y2, z1, z2;
  const double cc = std::cos(0.3), ss = std::sin(0.3);
  rotate_pair<double>(1.5, -2.0, cc, ss, y1, y2);
  EXPECT_NEAR(y1, 1.5 * cc + 2.0 * ss, 1e-12);
  EXPECT_NEAR(y2, -2.0 * cc + 1.5 * ss, 1e-12);
  rotate_pair_t<double>(y1, y2, cc, ss, z1, z2);
  EXPECT_NEAR(z1, 1.5, 1e-12);
  EXPECT_NEAR(z2, -2.0, 1e-12);
  // transpose is the adjoint: <R x, g> == <x, R^T g>, and the table gradient matches finite differences
  {
    const double x1 = 0.7, x2 = -1.1, g1 = 0.4, g2 = 2.5, c0 = 0.8, s0 = -0.35;
    double r1, r2, t1, t2, dc, ds;
    rotate_pair<double>(x1, x2, c0, s0, r1, r2);
    rotate_pair_t<double>(g1, g2, c0, s0, t1, t2);
    EXPECT_NEAR(r1 * g1 + r2 * g2, x1 * t1 + x2 * t2, 1e-12);
    rotate_pair_dtables<double>(x1, x2, g1, g2, dc, ds);
    const double h = 1e-6;
    double a1, a2, b1, b2;
    rotate_pair<double>(x1, x2, c0 + h, s0, a1, a2);
    rotate_pair<double>(x1, x2, c0 - h, s0, b1, b2);
    EXPECT_NEAR(dc, ((a1 - b1) * g1 + (a2 - b2) * g2) / (2 * h), 1e-8);
    rotate_pair<double>(x1, x2, c0, s0 + h, a1, a2);
    rotate_pair<double>(x1, x2, c0, s0 - h, b1, b2);
    EXPECT_NEAR(ds, ((a1 - b1) * g1 + (a2 - b2) * g2) / (2 * h), 1e-8);
  }
  // FoPE tables: Dk = 2, P = 3, pair 2 padded
  {
    const int64_t freqs[2 * 2] = {eighth[0], eighth[1], third[0], third[1]};  // (Dk, 2) turn fractions
    const float a[2 * 3] = {1.f, 0.5f, 0.f, 0.2f, -1.f, 0.f};  // (Dk, P)
    const float b[2 * 3] = {0.3f, 1.f, 0.f, 1.f, 0.1f, 0.f};
    const float pad[3] = {0.f, 0.f, 1.f};
    double C, S;
    fope_cos_sin<double>(5, 1, 2, 3, freqs, a, b, pad, C, S);
    EXPECT_NEAR(C, 0.5 * std::cos(2 * pi * 5 / 8) - 1.0 * std::cos(2 * pi * 5 / 3), 1e-12);
    EXPECT_NEAR(S, 1.0 * std::sin(2 * pi * 5 / 8) + 0.1 * std::sin(2 * pi * 5 / 3), 1e-7);
    fope_cos_sin<double>(5, 2, 2, 3, freqs, a, b, pad, C, S);
    EXPECT_NEAR(C, 1.0, 0);
    EXPECT_NEAR(S, 1.0, 0);
    double ck[2], sk[2], C2, S2;
    fope_basis<double>(5, 2, freqs, ck, sk);
    fope_cos_sin_basis<double>(1, 2, 3, ck, sk, a, b, pad, C2, S2);
    fope_cos_sin<double>(5, 1, 2, 3, freqs, a, b, pad, C, S);
    EXPECT_NEAR(C2, C, 1e-12);
    EXPECT_NEAR(S2, S, 1e-12);
  }
  // ALiBi: -slope * |m - n|
  EXPECT_NEAR(alibi_bias<float>(0.25f, 3, 10), -1.75, 1e-7);
  EXPECT_NEAR(alibi_bias<float>(0.25f, 10, 3), -1.75, 1e-7);
  // TAPA: amp * cos(Omega * dot), Omega = c |m-n|^alpha; derivatives against finite differences
  {
    const double om = tapa_omega<double>(2.0, 0.5, 9, 5);
    EXPECT_NEAR(om, 2.0 * std::sqrt(4.0), 1e-12);
    EXPECT_NEAR(tapa_omega<double>(2.0, 0.5, 5, 5), 0.0, 0);
    // |0|^alpha = 0 for every alpha, alpha = 0 included (pow(0, 0) is 1); other distances give phase_scale
    EXPECT_NEAR(tapa_omega<double>(2.0, 0.0, 5, 5), 0.0, 0);
    EXPECT_NEAR(tapa_omega<float>(2.0, 0.0, 5, 5), 0.0, 0);
    EXPECT_NEAR(tapa_omega<double>(2.0, 0.0, 5, 8), 2.0, 0);
    EXPECT_NEAR(tapa_omega<double>(2.0, 0.0, 8, 5), 2.0, 0);
    const double amp = 1.3, dot = 0.21, ds = 0.7;
    double ga, gd;
    tapa_grad<double>(ds, amp, om, dot, ga, gd);
    const double h = 1e-6;
    EXPECT_NEAR(ga, ds * (tapa_score<double>(amp + h, om, dot) - tapa_score<double>(amp - h, om, dot)) / (2 * h), 1e-7);
    EXPECT_NEAR(gd, ds * (tapa_score<double>(amp, om, dot + h) - tapa_score<double>(amp, om, dot - h)) / (2 * h), 1e-7);
  }
  // rotate_row: half layout, rotary
  {
    const int64_t idx1[2] = {0, 1}, idx2[2] = {2, 3};
    const int64_t turns[2 * 2] = {eighth[0], eighth[1], 0, 0};
    const float scale[2] = {1.f, 1.f};
    EncParams p;
    p.kind = ENC_ROTARY; p.npairs = 2; p.idx1 = idx1; p.idx2 = idx2; p.pair_turns = turns; p.pair_scale = scale;
    const float x[4] = {1.f, 2.f, 3.f, 4.f};
    float y[4];
    rotate_row<float, float>(p, x, 1, 4, 2, 0, y);
    EXPECT_NEAR(y[0], 1.0 * std::cos(pi / 2) - 3.0 * std::sin(pi / 2), 1e-6);  // position 2: 1/4 turn
    EXPECT_NEAR(y[2], 3.0 * std::cos(pi / 2) + 1.0 * std::sin(pi / 2), 1e-6);
    EXPECT_NEAR(y[1], 2.0, 0);
    EXPECT_NEAR(y[3], 4.0, 0);
  }
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("encoding_math: all checks passed\n");
  return 0;
}
