#include "catch.hpp"

#include <fasterai/data/batches.hpp>

#include <vector>

using namespace fasterai::data;

namespace {

// Example i has data i and target -i.
class Numbers : public torch::data::datasets::Dataset<Numbers> {
 public:
  explicit Numbers(size_t n) : n_(n) {}
  torch::data::Example<> get(size_t i) override {
    const auto v = static_cast<std::int64_t>(i);
    return {torch::tensor({v}), torch::tensor(-v)};
  }
  c10::optional<size_t> size() const override { return n_; }

 private:
  size_t n_;
};

std::vector<std::int64_t> walk(const Batches& b, std::vector<std::int64_t>* sizes = nullptr) {
  std::vector<std::int64_t> seen;
  b.for_each([&](const torch::data::Example<>& e) {
    CHECK(torch::equal(e.target, -e.data.squeeze(1)));
    if (sizes) sizes->push_back(e.data.size(0));
    for (std::int64_t i = 0; i < e.data.size(0); ++i) seen.push_back(e.data[i][0].item<std::int64_t>());
  });
  return seen;
}

}  // namespace

TEST_CASE("Batches from premade batches go through them in order every epoch", "[batches]") {
  std::vector<torch::data::Example<>> made{{torch::ones({2, 1}), -torch::ones({2})},
                                           {torch::zeros({1, 1}), torch::zeros({1})}};
  Batches b(made);
  CHECK(b.size() == 2);
  CHECK(walk(b) == std::vector<std::int64_t>{1, 1, 0});
  CHECK(walk(b) == std::vector<std::int64_t>{1, 1, 0});
  CHECK(Batches().empty());
  CHECK(walk(Batches()).empty());
}

TEST_CASE("make_batches counts batches and stacks unstacked examples", "[batches]") {
  std::vector<std::int64_t> sizes;
  auto seq = make_batches(Numbers(10), LoaderOptions(4));
  CHECK(seq.size() == 3);
  CHECK(walk(seq, &sizes) == std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
  CHECK(sizes == std::vector<std::int64_t>{4, 4, 2});

  auto dropped = make_batches(Numbers(10), LoaderOptions(4).drop_last(true));
  CHECK(dropped.size() == 2);
  CHECK(walk(dropped).size() == 8);
}

TEST_CASE("make_batches shuffles reproducibly under torch::manual_seed", "[batches]") {
  auto shuffled = make_batches(Numbers(50), LoaderOptions(8).shuffle(true));
  torch::manual_seed(1);
  const auto a = walk(shuffled);
  const auto b = walk(shuffled);
  torch::manual_seed(1);
  const auto c = walk(shuffled);
  CHECK(a.size() == 50);
  CHECK(a != b);  // a new order each epoch
  CHECK(a == c);  // the same order for the same seed
  auto sorted = a;
  std::sort(sorted.begin(), sorted.end());
  for (std::int64_t i = 0; i < 50; ++i) CHECK(sorted[static_cast<size_t>(i)] == i);
}

TEST_CASE("make_batches and Batches reject bad arguments", "[batches]") {
  CHECK_THROWS_WITH(make_batches(Numbers(3), LoaderOptions(0)),
                    Catch::Contains("batch_size") && Catch::Contains(">= 1"));
  std::shared_ptr<std::vector<torch::data::Example<>>> none;
  CHECK_THROWS_WITH(Batches(none, 1), Catch::Contains("loader"));
}
