// Train the compact VGG on Fashion-MNIST with fit_one_cycle, as the article trains its
// baseline: the per-epoch table, then the test accuracy and the time per epoch.
//
//   train_fashion_mnist [--epochs 3] [--lr 5e-3] [--batch-size 128] [--subset N]
//                       [--data /usr/share/datasets/fashion-mnist] [--seed 42] [--csv FILE]
#include <fasterai/fasterai.hpp>
#include <fasterai/data/fashion_mnist.hpp>

#include <chrono>
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

namespace {

// A bad command line: reported with the usage text (other errors without it).
struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Args {
  int epochs = 3;
  double lr = 5e-3;
  std::size_t batch_size = 128;
  std::optional<std::int64_t> subset;
  std::string data = "/usr/share/datasets/fashion-mnist";
  std::uint64_t seed = 42;
  std::string csv;
};

void usage(std::ostream& os) {
  os << "usage: train_fashion_mnist [options]\n"
        "  --epochs N       epochs of one-cycle training (default 3)\n"
        "  --lr X           peak learning rate of the cycle (default 5e-3)\n"
        "  --batch-size N   training batch size (default 128)\n"
        "  --subset N       train on a random N training images, test on N/6 (quick runs)\n"
        "  --data PATH      folder of the Fashion-MNIST IDX files\n"
        "                   (default /usr/share/datasets/fashion-mnist)\n"
        "  --seed N         seed of initialization, shuffling and subsets (default 42)\n"
        "  --csv FILE       also log the table to FILE\n"
        "  --help           this message\n";
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string_view flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      usage(std::cout);
      std::exit(0);
    }
    if (i + 1 >= argc) throw usage_error("missing value after " + std::string(flag));
    const std::string value = argv[++i];
    // A whole-string number, or a usage error naming the flag.
    auto number = [&](auto convert) {
      std::size_t used = 0;
      try {
        const auto parsed = convert(value, &used);
        if (used == value.size()) return parsed;
      } catch (const std::logic_error&) {
      }
      throw usage_error("bad value '" + value + "' for " + std::string(flag));
    };
    if (flag == "--epochs") a.epochs = number([](const std::string& v, std::size_t* n) { return std::stoi(v, n); });
    else if (flag == "--lr") a.lr = number([](const std::string& v, std::size_t* n) { return std::stod(v, n); });
    else if (flag == "--batch-size") a.batch_size = number([](const std::string& v, std::size_t* n) { return std::stoul(v, n); });
    else if (flag == "--subset") a.subset = number([](const std::string& v, std::size_t* n) { return std::stoll(v, n); });
    else if (flag == "--data") a.data = value;
    else if (flag == "--seed") a.seed = number([](const std::string& v, std::size_t* n) { return std::stoull(v, n); });
    else if (flag == "--csv") a.csv = value;
    else throw usage_error("unknown option " + std::string(flag));
  }
  return a;
}

}  // namespace

int main(int argc, char** argv) try {
  using namespace fasterai;
  const Args args = parse(argc, argv);

  auto options = data::FashionMNISTOptions().root(args.data);
  auto train_options = options, test_options = options;
  if (args.subset) {
    train_options.subset(*args.subset).subset_seed(args.seed);
    test_options.subset(std::max<std::int64_t>(1, *args.subset / 6)).subset_seed(args.seed);
  }
  data::FashionMNIST train(data::Split::Train, train_options);
  data::FashionMNIST test(data::Split::Test, test_options);
  std::cout << "Fashion-MNIST: " << *train.size() << " training, " << *test.size()
            << " test images from " << args.data << "\n";

  torch::manual_seed(args.seed);
  auto model = models::compact_vgg();
  std::cout << "compact VGG {16, 32, 64}: " << count_parameters(model) << " parameters; "
            << args.epochs << " epochs of fit_one_cycle, max_lr " << args.lr << ", batch "
            << args.batch_size << ", " << torch::get_num_threads() << " threads\n\n";

  Learner learn(model,
                data::make_batches(std::move(train), data::LoaderOptions(args.batch_size).shuffle(true)),
                data::make_batches(std::move(test), data::LoaderOptions(1000)),
                LearnerOptions().seed(args.seed).csv_log(args.csv));
  const auto records = learn.fit_one_cycle(args.epochs, args.lr);

  double seconds = 0;
  for (const auto& r : records) seconds += r.seconds;
  const double accuracy = records.back().metrics.at(0);
  std::cout << std::fixed << std::setprecision(2) << "\nTest accuracy: " << 100 * accuracy
            << "%\nTime per epoch: " << seconds / double(records.size()) << " s (train + test)\n";
  return 0;
} catch (const usage_error& e) {
  std::cerr << "train_fashion_mnist: " << e.what() << "\n";
  usage(std::cerr);
  return 2;
} catch (const std::exception& e) {
  std::cerr << "train_fashion_mnist: " << e.what() << "\n";
  return 1;
}
