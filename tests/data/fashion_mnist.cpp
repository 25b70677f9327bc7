#include "catch.hpp"

#include <fasterai/data/fashion_mnist.hpp>

#include <unistd.h>

#include <filesystem>
#include <string>

namespace fs = std::filesystem;
using namespace fasterai::data;

namespace {

const fs::path installed = "/usr/share/datasets/fashion-mnist";

bool have_dataset() { return fs::exists(installed / "t10k-images-idx3-ubyte.gz"); }

struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("fasterai-fmnist-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

// A small, valid Fashion-MNIST split in `dir`: image i is filled with the value i, label i % 10.
void write_split(const fs::path& dir, const std::string& prefix, std::int64_t n, bool gzip) {
  auto images = torch::arange(n, torch::kLong).to(torch::kUInt8).view({n, 1, 1}).expand({n, 28, 28});
  auto labels = (torch::arange(n, torch::kLong) % 10).to(torch::kUInt8);
  const std::string ext = gzip ? ".gz" : "";
  write_idx(dir / (prefix + "-images-idx3-ubyte" + ext), images.contiguous(), gzip);
  write_idx(dir / (prefix + "-labels-idx1-ubyte" + ext), labels, gzip);
}

}  // namespace

TEST_CASE("FashionMNIST reads the installed test split", "[fashion_mnist]") {
  if (!have_dataset()) {
    FASTERAI_SKIP("Fashion-MNIST is not installed at " << installed);
  }
  FashionMNIST test(Split::Test, FashionMNISTOptions().normalize(false));
  REQUIRE(test.size() == size_t{10000});
  CHECK(test.images().sizes() == torch::IntArrayRef({10000, 28, 28}));
  CHECK(test.images().scalar_type() == torch::kUInt8);
  CHECK(test.targets().scalar_type() == torch::kLong);
  // The test split is balanced: 1000 images per class.
  CHECK(torch::equal(torch::bincount(test.targets()), torch::full({10}, 1000, torch::kLong)));
  // Pixel mean close to the published statistics (those are of the training split).
  const double mean = test.images().to(torch::kFloat).mean().item<double>() / 255.0;
  CHECK(mean == Approx(FashionMNIST::pixel_mean).margin(0.01));

  const auto one = test.get(0);
  CHECK(one.data.sizes() == torch::IntArrayRef({1, 28, 28}));
  CHECK(one.data.min().item<float>() >= 0.0f);
  CHECK(one.data.max().item<float>() <= 1.0f);
  CHECK(one.target.item<std::int64_t>() == test.targets()[0].item<std::int64_t>());
}

TEST_CASE("FashionMNIST normalizes with the training statistics", "[fashion_mnist]") {
  TempDir dir;
  write_split(dir.path, "train", 20, /*gzip=*/true);
  FashionMNIST raw(Split::Train, FashionMNISTOptions().root(dir.path).normalize(false));
  FashionMNIST norm(Split::Train, FashionMNISTOptions().root(dir.path));
  const auto a = raw.get(7).data, b = norm.get(7).data;
  CHECK(a[0][0][0].item<float>() == Approx(7.0 / 255.0));
  CHECK(b[0][0][0].item<float>() ==
        Approx((7.0 / 255.0 - FashionMNIST::pixel_mean) / FashionMNIST::pixel_std));
}

TEST_CASE("FashionMNIST batches with one gather, as get() would one by one", "[fashion_mnist]") {
  TempDir dir;
  write_split(dir.path, "t10k", 30, /*gzip=*/false);  // plain files are found too
  FashionMNIST ds(Split::Test, FashionMNISTOptions().root(dir.path));
  const std::vector<size_t> idx{5, 0, 29, 5};
  const auto batch = ds.get_batch(idx);
  CHECK(batch.data.sizes() == torch::IntArrayRef({4, 1, 28, 28}));
  CHECK(batch.target.sizes() == torch::IntArrayRef({4}));
  for (size_t k = 0; k < idx.size(); ++k) {
    const auto one = ds.get(idx[k]);
    CHECK(torch::equal(batch.data[static_cast<std::int64_t>(k)], one.data));
    CHECK(batch.target[static_cast<std::int64_t>(k)].item<std::int64_t>() ==
          static_cast<std::int64_t>(idx[k] % 10));
  }
  CHECK_THROWS_WITH(ds.get(30), Catch::Contains("index") && Catch::Contains("30"));
  CHECK_THROWS_WITH(ds.get_batch(std::vector<size_t>{1, 99}), Catch::Contains("99"));
}

TEST_CASE("FashionMNIST subsets: first N, or a seeded random N", "[fashion_mnist]") {
  TempDir dir;
  write_split(dir.path, "train", 100, true);
  const auto opts = FashionMNISTOptions().root(dir.path).normalize(false);
  FashionMNIST first(Split::Train, FashionMNISTOptions(opts).subset(10));
  REQUIRE(first.size() == size_t{10});
  CHECK(torch::equal(first.images().select(1, 0).select(1, 0).to(torch::kLong),
                     torch::arange(10, torch::kLong)));

  FashionMNIST r1(Split::Train, FashionMNISTOptions(opts).subset(10).subset_seed(3));
  FashionMNIST r2(Split::Train, FashionMNISTOptions(opts).subset(10).subset_seed(3));
  FashionMNIST r3(Split::Train, FashionMNISTOptions(opts).subset(10).subset_seed(4));
  CHECK(torch::equal(r1.images(), r2.images()));
  CHECK(torch::equal(r1.targets(), r2.targets()));
  CHECK_FALSE(torch::equal(r1.images(), r3.images()));
  // Distinct images, labels still matching their images.
  const auto ids = r1.images().select(1, 0).select(1, 0).to(torch::kLong);
  CHECK(std::get<0>(torch::_unique(ids)).numel() == 10);
  CHECK(torch::equal(ids % 10, r1.targets()));

  using Catch::Contains;
  CHECK_THROWS_WITH(FashionMNIST(Split::Train, FashionMNISTOptions(opts).subset(0)),
                    Contains("subset") && Contains("0") && Contains("1 to the 100"));
  CHECK_THROWS_WITH(FashionMNIST(Split::Train, FashionMNISTOptions(opts).subset(101)),
                    Contains("subset") && Contains("101"));
}

TEST_CASE("FashionMNIST names the file and the fault of bad data", "[fashion_mnist]") {
  TempDir dir;
  using Catch::Contains;
  SECTION("missing folder") {
    CHECK_THROWS_WITH(FashionMNIST(Split::Train, FashionMNISTOptions().root(dir.path / "none")),
                      Contains("train-images-idx3-ubyte.gz") && Contains("does not exist"));
  }
  SECTION("missing labels") {
    write_split(dir.path, "train", 5, true);
    fs::remove(dir.path / "train-labels-idx1-ubyte.gz");
    CHECK_THROWS_WITH(FashionMNIST(Split::Train, FashionMNISTOptions().root(dir.path)),
                      Contains("train-labels-idx1-ubyte.gz") && Contains("does not exist"));
  }
  SECTION("images of the wrong shape") {
    write_split(dir.path, "t10k", 5, true);
    write_idx(dir.path / "t10k-images-idx3-ubyte.gz", torch::zeros({5, 32, 32}, torch::kUInt8),
              true);
    CHECK_THROWS_WITH(FashionMNIST(Split::Test, FashionMNISTOptions().root(dir.path)),
                      Contains("t10k-images-idx3-ubyte.gz") && Contains("[5, 32, 32]") &&
                          Contains("[N, 28, 28]"));
  }
  SECTION("labels of the wrong type") {
    write_split(dir.path, "t10k", 5, true);
    write_idx(dir.path / "t10k-labels-idx1-ubyte.gz", torch::zeros({5}, torch::kInt), true);
    CHECK_THROWS_WITH(FashionMNIST(Split::Test, FashionMNISTOptions().root(dir.path)),
                      Contains("t10k-labels-idx1-ubyte.gz") && Contains("Int"));
  }
  SECTION("counts that differ") {
    write_split(dir.path, "t10k", 5, true);
    write_idx(dir.path / "t10k-labels-idx1-ubyte.gz", torch::zeros({4}, torch::kUInt8), true);
    CHECK_THROWS_WITH(FashionMNIST(Split::Test, FashionMNISTOptions().root(dir.path)),
                      Contains("4 labels") && Contains("5 images"));
  }
  SECTION("a label out of range") {
    write_split(dir.path, "t10k", 5, true);
    write_idx(dir.path / "t10k-labels-idx1-ubyte.gz",
              torch::tensor({0, 1, 12, 3, 4}, torch::kLong).to(torch::kUInt8), true);
    CHECK_THROWS_WITH(FashionMNIST(Split::Test, FashionMNISTOptions().root(dir.path)),
                      Contains("label 12") && Contains("0 to 9"));
  }
}
