#pragma once
// fasterai's data-parallel training over c10d process groups. Opt-in beside
// <fasterai/fasterai.hpp>: it pulls LibTorch's c10d.

#include <fasterai/dist/checkpoint.hpp>
#include <fasterai/dist/consistency.hpp>
#include <fasterai/dist/data_parallel.hpp>
#include <fasterai/dist/launched_job.hpp>
#include <fasterai/dist/process_group.hpp>
#include <fasterai/dist/shard.hpp>
