#include "catch.hpp"

#include <numeric>

#include <fasterai/sparse/selection.hpp>
#include <fasterai/sparse/sparsifier.hpp>

using fasterai::detail::kth_smallest;
using fasterai::detail::select_lowest;

TEST_CASE("radix select finds the k-th smallest, negatives and ties included", "[selection]") {
  torch::manual_seed(3);
  auto a = torch::randn({1000});
  auto b = torch::randn({777});
  auto sorted = std::get<0>(torch::cat({a, b}).sort());
  for (std::int64_t k : {1, 2, 500, 1776, 1777})
    CHECK(kth_smallest({a, b}, k).value == sorted[k - 1].item<float>());
  const auto t = kth_smallest({torch::tensor({1.0f, -1.0f, 1.0f, 2.0f, 1.0f})}, 3);
  CHECK(t.value == 1.0f);
  CHECK(t.ties_taken == 2);
  CHECK(t.ties_total == 3);
}

TEST_CASE("select_lowest selects exactly k, ties to the earliest positions", "[selection]") {
  auto a = torch::tensor({3.f, 1.f, 2.f, 1.f});
  auto b = torch::tensor({1.f, 0.f});
  auto sel = select_lowest({a, b}, 3);
  auto m = sel.masks;
  CHECK(sel.counts == std::vector<std::int64_t>{2, 1});  // 0, then two of the three 1s: a[1], a[3]
  CHECK(m[0].equal(torch::tensor({false, true, false, true})));
  CHECK(m[1].equal(torch::tensor({false, true})));
  m = select_lowest({a, b}, 4).masks;
  CHECK(m[1].equal(torch::tensor({true, true})));
  m = select_lowest({a, b}, 0).masks;
  CHECK(m[0].sum().item<int>() + m[1].sum().item<int>() == 0);
  m = select_lowest({a, b}, 6).masks;
  CHECK(m[0].all().item<bool>());
}

TEST_CASE("select_lowest handles ties spread over many chunks", "[selection]") {
  // 1M values, half of them exactly zero: the chunked tie quota must keep position order.
  auto v = torch::rand({1 << 20});
  v.view({-1, 2}).select(1, 0).zero_();
  const std::int64_t k = 300'000;
  const auto m = select_lowest({v}, k).masks.front();
  CHECK(m.sum().item<std::int64_t>() == k);
  const auto zeros = v.eq(0).nonzero().flatten();
  CHECK(m.index_select(0, zeros.narrow(0, 0, k)).all().item<bool>());
  CHECK_FALSE(m.index_select(0, zeros.narrow(0, k, zeros.numel() - k)).any().item<bool>());
}

namespace {

using fasterai::detail::select_lowest_magnitude;

// The general path on |w|: select_lowest over the scores, then (Global) every tensor that would
// be selected entirely keeps its largest score.
fasterai::detail::Selection reference(const std::vector<torch::Tensor>& weights, std::int64_t k, bool keep_one) {
  std::vector<torch::Tensor> scores;
  for (const auto& w : weights) scores.push_back(w.abs().reshape({-1}));
  auto sel = select_lowest(scores, k);
  if (keep_one)
    for (size_t i = 0; i < scores.size(); ++i)
      if (sel.counts[i] == scores[i].numel()) {
        sel.masks[i][scores[i].argmax().item<std::int64_t>()] = false;
        --sel.counts[i];
      }
  return sel;
}

// Weights on a coarse grid: many exact ties, both zeros, negatives mirroring positives.
std::vector<torch::Tensor> tied_weights(std::int64_t big) {
  std::vector<torch::Tensor> w;
  for (std::int64_t n : {std::int64_t{37}, big, std::int64_t{1000}, big / 3}) {
    auto t = torch::round(torch::randn({n}) * 8) / 8;
    t.index_put_({torch::rand({n}) < 0.1}, -0.0f);
    w.push_back(t);
  }
  w[2] = w[2] * 1e-3;  // a small layer whose values all lie below most others
  return w;
}

// Runs the fused selection on copies and checks it against the general path, and that the
// multipliers and the zeroed weights follow the mask.
void check_same_as_general(const std::vector<torch::Tensor>& weights, std::vector<std::int64_t> ks, bool keep_one) {
  std::vector<torch::Tensor> w, keep;
  for (const auto& x : weights) w.push_back(x.clone()), keep.push_back(torch::full_like(x, 7.0f));
  const auto fused = select_lowest_magnitude(w, ks, keep, /*zero_weights=*/true, keep_one);
  REQUIRE(fused.non_finite == -1);
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto expected = ks.size() == 1 ? reference(weights, ks[0], keep_one)
                                         : reference({weights[i]}, ks[i], false);
    const size_t e = ks.size() == 1 ? i : 0;
    CHECK(fused.masks[i].equal(expected.masks[e].view(weights[i].sizes())));
    CHECK(fused.counts[i] == expected.counts[e]);
    CHECK(keep[i].equal(torch::logical_not(fused.masks[i]).to(torch::kFloat32)));
    CHECK(w[i].equal(weights[i] * keep[i]));
  }
  // Again into the first run's mask buffers, scrambled: the same masks, in those buffers.
  std::vector<torch::Tensor> reused;
  for (const auto& m : fused.masks) reused.push_back(m.copy_(torch::rand(m.sizes()) < 0.5));
  for (size_t i = 0; i < weights.size(); ++i) w[i].copy_(weights[i]);
  const auto again = select_lowest_magnitude(w, ks, keep, /*zero_weights=*/true, keep_one, reused);
  for (size_t i = 0; i < weights.size(); ++i) {
    CHECK(again.masks[i].data_ptr() == reused[i].data_ptr());
    CHECK(again.counts[i] == fused.counts[i]);
    CHECK(torch::logical_not(again.masks[i]).to(torch::kFloat32).equal(keep[i]));
    CHECK(w[i].equal(weights[i] * keep[i]));
  }
}

}  // namespace

TEST_CASE("select_lowest_magnitude selects what the general path selects, ties included", "[selection]") {
  torch::manual_seed(11);
  const int threads = at::get_num_threads();
  for (int t : {1, 2}) {
    at::set_num_threads(t);
    const auto w = tied_weights(700'000);  // several chunks of 2^18 per tensor
    std::int64_t total = 0;
    for (const auto& x : w) total += x.numel();
    const auto zeros = [&] {
      std::int64_t z = 0;
      for (const auto& x : w) z += x.eq(0).sum().item<std::int64_t>();
      return z;
    }();
    INFO("threads " << t);
    // Around the zeros (the first tie run), inside later tie runs, all and nothing.
    for (std::int64_t k : {std::int64_t{0}, std::int64_t{1}, zeros - 1, zeros, zeros + 1, total / 3,
                           total / 2 + 12345, total - 5, total}) {
      INFO("k " << k);
      check_same_as_general(w, {k}, /*keep_one=*/true);
      check_same_as_general(w, {k}, /*keep_one=*/false);
    }
    check_same_as_general(w, {0, 1000, 999, w[3].numel() / 2}, false);
    check_same_as_general(w, {37, w[1].numel() - 1, 1000, 0}, false);
  }
  at::set_num_threads(threads);
}

TEST_CASE("select_lowest_magnitude: a tensor selected entirely keeps its largest magnitude", "[selection]") {
  // The small tensor's values all lie below the threshold: its first largest magnitude stays.
  std::vector<torch::Tensor> w{torch::tensor({0.1f, -0.3f, 0.3f, 0.2f}), torch::tensor({5.f, 1.f, 6.f, 7.f})};
  std::vector<torch::Tensor> keep{torch::empty({4}), torch::empty({4})};
  const auto sel = select_lowest_magnitude(w, {5}, keep, true, /*keep_one=*/true);
  CHECK(sel.masks[0].equal(torch::tensor({true, false, true, true})));
  CHECK(sel.masks[1].equal(torch::tensor({false, true, false, false})));
  CHECK(sel.counts == std::vector<std::int64_t>{3, 1});
  CHECK(w[0].equal(torch::tensor({0.f, -0.3f, 0.f, 0.f})));
  CHECK(keep[0].equal(torch::tensor({0.f, 1.f, 0.f, 0.f})));
}

TEST_CASE("select_lowest_magnitude reports NaN and Inf before writing anything", "[selection]") {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity(),
                    std::numeric_limits<float>::infinity()}) {
    auto a = torch::randn({300'000});
    auto b = torch::randn({50});
    b[17] = bad;
    std::vector<torch::Tensor> w{a.clone(), b.clone(), torch::randn({3})};
    std::vector<torch::Tensor> keep{torch::full({300'000}, 7.f), torch::full({50}, 7.f), torch::full({3}, 7.f)};
    for (auto ks : {std::vector<std::int64_t>{1000}, std::vector<std::int64_t>{10, 10, 1}}) {
      const auto sel = select_lowest_magnitude(w, ks, keep, true, true);
      CHECK(sel.non_finite == 1);
      CHECK(w[0].equal(a));
      CHECK(w[1].slice(0, 0, 17).equal(b.slice(0, 0, 17)));
      for (const auto& k : keep) CHECK(k.eq(7.f).all().item<bool>());
    }
  }
}

TEST_CASE("Weight/L1 sparsifiers: float32 weights (fused selection) get the masks of float64 ones (general path)",
          "[selection][sparsifier]") {
  namespace g = fasterai::granularity;
  namespace m = fasterai::method;
  namespace c = fasterai::criteria;
  auto make = [](torch::Dtype dtype) {
    torch::manual_seed(5);
    torch::nn::Sequential net(torch::nn::Conv2d(3, 8, 3), torch::nn::ReLU(), torch::nn::Conv2d(8, 8, 3),
                              torch::nn::Flatten(), torch::nn::Linear(8 * 4 * 4, 10));
    torch::NoGradGuard no_grad;
    for (auto& p : net->parameters()) p.copy_(torch::round(p * 16) / 16);  // many ties
    net->named_parameters()["0.weight"].mul_(1e-3);  // a layer the Global method would empty
    net->to(dtype);
    return net;
  };
  auto single = make(torch::kFloat32), twice = make(torch::kFloat64);
  auto opts = fasterai::SparsifierOptions().include_linear(true);
  fasterai::Sparsifier<g::Weight, m::Global, c::L1> gs(single, opts), gd(twice, opts);
  fasterai::Sparsifier<g::Weight, m::Local, c::L1> ls(single, opts), ld(twice, opts);
  for (double s : {10.0, 45.0, 80.0, 99.0}) {
    INFO("sparsity " << s);
    gs.prune(s), gd.prune(s);
    for (const auto& name : gs.layer_names()) CHECK(gs.mask(name).equal(gd.mask(name)));
    ls.prune(s), ld.prune(s);
    for (const auto& name : ls.layer_names()) CHECK(ls.mask(name).equal(ld.mask(name)));
  }
  for (const auto& p : single->named_parameters())
    CHECK(p.value().to(torch::kFloat64).equal(twice->named_parameters()[p.key()]));

  // A mask handed out by mask() is a copy that later selections do not rewrite.
  {
    const auto held = gs.mask("2");
    const auto snapshot = held.clone();
    gs.prune(30);
    CHECK(held.equal(snapshot));
    CHECK_FALSE(gs.mask("2").equal(held));
  }
  gs.prune(60), gd.prune(60);
  for (const auto& name : gs.layer_names()) CHECK(gs.mask(name).equal(gd.mask(name)));

  // A NaN: the layer is named, masks and weights stay as they were.
  const auto mask = gs.mask("2").clone();
  {
    torch::NoGradGuard no_grad;
    single->named_parameters()["4.weight"][3][7] = std::nan("");
  }
  const auto before = single->named_parameters()["2.weight"].clone();
  CHECK_THROWS_WITH(gs.prune(50), Catch::Contains("NaN or Inf") && Catch::Contains("'4'"));
  CHECK_THROWS_WITH(ls.prune(50), Catch::Contains("NaN or Inf") && Catch::Contains("'4'"));
  CHECK(gs.mask("2").equal(mask));
  CHECK(single->named_parameters()["2.weight"].equal(before));
}

TEST_CASE("select_lowest selects what a stable sort selects: negatives, both zeros, ties across tensors",
          "[selection]") {
  // The reference: the k first positions of a stable sort of all values (floats compared, so
  // -0 ties with +0), tensor order then flat index.
  auto reference = [](const std::vector<torch::Tensor>& v, std::int64_t k) {
    std::vector<torch::Tensor> flat;
    for (const auto& x : v) flat.push_back(x.reshape({-1}));
    const auto all = torch::cat(flat);
    const auto a = all.accessor<float, 1>();
    std::vector<std::int64_t> order(static_cast<std::size_t>(all.numel()));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t x, std::int64_t y) { return a[x] < a[y]; });
    auto m = torch::zeros({all.numel()}, torch::kBool);
    for (std::int64_t i = 0; i < k; ++i) m[order[static_cast<std::size_t>(i)]] = true;
    std::vector<torch::Tensor> out;
    std::int64_t offset = 0;
    for (const auto& x : v) out.push_back(m.narrow(0, offset, x.numel()).view(x.sizes())), offset += x.numel();
    return out;
  };
  torch::manual_seed(5);
  const int threads = at::get_num_threads();
  for (int t : {1, 2}) {
    at::set_num_threads(t);
    for (std::int64_t big : {std::int64_t{40}, std::int64_t{300'000}}) {  // one chunk, several
      std::vector<torch::Tensor> v;
      for (std::int64_t n : {big, big / 2 + 3, std::int64_t{17}}) {
        auto x = torch::round(torch::randn({n}) * 4) / 4;
        x.index_put_({torch::rand({n}) < 0.2}, -0.0f);
        v.push_back(x.view({-1, 1}));  // not flat: masks keep the scores' shapes
      }
      std::int64_t total = 0;
      for (const auto& x : v) total += x.numel();
      for (std::int64_t k : {std::int64_t{0}, std::int64_t{1}, total / 7, total / 2, total - 1, total}) {
        INFO("threads " << t << ", " << total << " values, k " << k);
        const auto sel = select_lowest(v, k);
        const auto expected = reference(v, k);
        std::int64_t count = 0;
        for (size_t i = 0; i < v.size(); ++i) {
          CHECK(sel.masks[i].equal(expected[i]));
          CHECK(sel.counts[i] == expected[i].sum().item<std::int64_t>());
          count += sel.counts[i];
        }
        CHECK(count == k);
      }
    }
  }
  at::set_num_threads(threads);
}
