// One ATME merge step on CPU tensors, fused: the math of cait_kernels.atme.atme_step_reference
// (DESIGN.md, "ATME") in one pass per image instead of ~450 small torch ops, so merging costs
// microseconds even at batch 1. The CPU kernel of torch.ops.cait_cpu.atme_step (and .out, which writes
// into given tensors).
//
// Exactness: similarities are cosines computed in float64 and rounded to float32 as in the
// reference, candidates and selection use the reference's order (similarity high first; ties by
// block raster index, smaller token, larger token, cell-edge slot), so owners and sizes equal the
// reference's; merged features are built in the reference's operation order (root row, then the
// absorbed tokens in increasing index), so fp32 and fp64 features equal it bit for bit (fp16/bf16
// are rounded once instead of per update: within an ulp, and closer to the exact mean).
//
// Phases, each parallel over images:
//   1. select: per block, Kruskal's maximum spanning forest over neighbouring token pairs; per image
//      the r strongest forest edges; group labels = smallest token index of each joined group.
//   2. merge: prefix rows copied, survivors in raster order, size-weighted means, owner rewritten.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>
#include <vector>

namespace {

constexpr double kNormEps = 1e-12;  // atme.NORM_EPS: a zero metric row has similarity 0 with everything

struct Edge {
  float sim;
  int64_t block, lo, hi, slot;
};

// The reference's order: similarity high first (NaN first, as torch's descending sort), then
// block raster index, smaller token, larger token, cell-edge slot. A strict total order.
bool stronger(const Edge& a, const Edge& b) {
  const bool a_nan = std::isnan(a.sim), b_nan = std::isnan(b.sim);
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a.sim != b.sim) return a.sim > b.sim;
  if (a.block != b.block) return a.block < b.block;
  if (a.lo != b.lo) return a.lo < b.lo;
  if (a.hi != b.hi) return a.hi < b.hi;
  return a.slot < b.slot;
}

// Union-find whose root is always the smallest index of its set.
int64_t find_root(std::vector<int64_t>& parent, int64_t i) {
  while (parent[i] != i) {
    parent[i] = parent[parent[i]];
    i = parent[i];
  }
  return i;
}

bool join(std::vector<int64_t>& parent, int64_t a, int64_t b) {
  a = find_root(parent, a);
  b = find_root(parent, b);
  if (a == b) return false;
  parent[std::max(a, b)] = std::min(a, b);
  return true;
}

struct Grid {
  int64_t height, width, block, tokens;
};

// Float64 dot product with independent partial sums (the compiler vectorizes them). The summation
// order differs from torch's, which moves a float64 result by an ulp or so: the similarities are
// rounded to float32, so implementations agree on them (the DESIGN's reason for float64).
double dot(const double* u, const double* v, int64_t len) {
  constexpr int kLanes = 8;
  double partial[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= len; c += kLanes)
    for (int k = 0; k < kLanes; ++k) partial[k] += u[c + k] * v[c + k];
  double sum = 0.0;
  for (; c < len; ++c) sum += u[c] * v[c];
  for (int k = 0; k < kLanes; ++k) sum += partial[k];
  return sum;
}

// Phase 1 for one image: labels[i] = smallest token index of token i's group after merging r.
// metric: (N, channels) rows of the spatial tokens; owner: (H*W,) token of every cell.
template <typename metric_t>
void select_groups(const metric_t* metric, int64_t channels, const int32_t* owner, const Grid& g, int64_t r, int64_t* labels) {
  const int64_t n = g.tokens, b = g.block;
  const std::vector<double> rows(metric, metric + n * channels);  // float64 copy of the metric
  std::vector<double> norm(n);
  for (int64_t i = 0; i < n; ++i) {
    const double* row = rows.data() + i * channels;
    norm[i] = std::max(std::sqrt(dot(row, row, channels)), kNormEps);
  }
  auto cosine = [&](int64_t lo, int64_t hi) {
    return static_cast<float>(dot(rows.data() + lo * channels, rows.data() + hi * channels, channels) / (norm[lo] * norm[hi]));
  };

  std::vector<int64_t> parent(n);
  std::iota(parent.begin(), parent.end(), 0);
  std::vector<Edge> forest, local;
  forest.reserve(n);
  local.reserve(2 * b * (b - 1));
  const int64_t block_rows = (g.height + b - 1) / b, block_cols = (g.width + b - 1) / b;
  for (int64_t br = 0; br < block_rows; ++br) {
    for (int64_t bc = 0; bc < block_cols; ++bc) {
      const int64_t index = br * block_cols + bc, row0 = br * b, col0 = bc * b;
      local.clear();
      int64_t slot = 0;
      // Cell-edge slots as atme.block_edges numbers them: horizontal pairs, then vertical pairs.
      auto offer = [&](int64_t r1, int64_t c1, int64_t r2, int64_t c2) {
        const int64_t s = slot++;
        if (r2 >= g.height || c2 >= g.width) return;
        const int64_t ta = owner[r1 * g.width + c1], tb = owner[r2 * g.width + c2];
        if (ta == tb) return;
        const int64_t lo = std::min(ta, tb), hi = std::max(ta, tb);
        local.push_back({cosine(lo, hi), index, lo, hi, s});
      };
      for (int64_t i = 0; i < b; ++i)
        for (int64_t j = 0; j + 1 < b; ++j) offer(row0 + i, col0 + j, row0 + i, col0 + j + 1);
      for (int64_t i = 0; i + 1 < b; ++i)
        for (int64_t j = 0; j < b; ++j) offer(row0 + i, col0 + j, row0 + i + 1, col0 + j);
      std::sort(local.begin(), local.end(), stronger);
      for (const Edge& e : local)
        if (join(parent, e.lo, e.hi)) forest.push_back(e);
    }
  }

  // A valid state (every token holds cells, all inside one block) has N - blocks >= r forest edges.
  const int64_t possible = static_cast<int64_t>(forest.size());
  TORCH_CHECK_VALUE(possible >= r, "cait_cpu::atme_step: owner leaves some of the ", n, " tokens without cells, so only ", possible,
                    " merges are possible, not r = ", r);
  std::nth_element(forest.begin(), forest.begin() + r, forest.end(), stronger);
  std::iota(parent.begin(), parent.end(), 0);
  for (int64_t k = 0; k < r; ++k) join(parent, forest[k].lo, forest[k].hi);
  for (int64_t i = 0; i < n; ++i) labels[i] = find_root(parent, i);
}

// Phase 2 for one image. x: (P+N, C); size: (P+N,); labels: (N,) from phase 1; scratch: (3N,).
// Writes x_out (P+N-r, C), size_out (P+N-r,), owner_out (H*W,). A group's size is summed and its
// mean built as root + sum_a (s_a / S) (x_a - root) over absorbed tokens in increasing index, as the
// reference does; the mean accumulates in at least float32 and is rounded once.
template <typename scalar_t, typename count_t>
void merge_groups(const scalar_t* x, const count_t* size, const int32_t* owner, const int64_t* labels, int64_t prefix, int64_t n,
                  int64_t channels, int64_t cells, scalar_t* x_out, count_t* size_out, int32_t* owner_out, int64_t* scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t *target = scratch, *next = scratch + n, *tail = scratch + 2 * n;  // new index; each group's members as a chain
  for (int64_t i = 0; i < n; ++i) {
    next[i] = -1;
    if (labels[i] == i) {
      tail[i] = i;
    } else {
      next[tail[labels[i]]] = i;
      tail[labels[i]] = i;
    }
  }
  std::copy(x, x + prefix * channels, x_out);
  std::copy(size, size + prefix, size_out);
  std::vector<acc_t> mean(channels);
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (labels[i] != i) {
      target[i] = target[labels[i]];  // labels[i] < i: already numbered
      continue;
    }
    target[i] = kept;
    const scalar_t* root = x + (prefix + i) * channels;
    scalar_t* out = x_out + (prefix + kept) * channels;
    count_t total = size[prefix + i];
    for (int64_t a = next[i]; a >= 0; a = next[a]) total += size[prefix + a];
    size_out[prefix + kept] = total;
    if (next[i] < 0) {
      std::copy(root, root + channels, out);  // a lone token is copied bit for bit
    } else {
      for (int64_t c = 0; c < channels; ++c) mean[c] = static_cast<acc_t>(root[c]);
      for (int64_t a = next[i]; a >= 0; a = next[a]) {
        const acc_t share = static_cast<acc_t>(count_t(size[prefix + a] / total));
        const scalar_t* absorbed = x + (prefix + a) * channels;
        for (int64_t c = 0; c < channels; ++c) mean[c] += share * (static_cast<acc_t>(absorbed[c]) - static_cast<acc_t>(root[c]));
      }
      for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<scalar_t>(mean[c]);
    }
    ++kept;
  }
  for (int64_t k = 0; k < cells; ++k) owner_out[k] = static_cast<int32_t>(target[owner[k]]);
}

// Shape, dtype and value checks of the inputs (the Python wrapper gives friendlier messages first;
// these keep a direct torch.ops call from reading out of bounds). Returns N, the spatial token count.
int64_t check_inputs(const at::Tensor& x, const at::Tensor& metric, const at::Tensor& size, const at::Tensor& owner, int64_t r,
                     at::IntArrayRef grid, int64_t prefix, int64_t block) {
  TORCH_CHECK_VALUE(x.dim() == 3 && metric.dim() == 3 && size.dim() == 2 && owner.dim() == 2,
                    "cait_cpu::atme_step: x (B, T, C), metric (B, T, Cm), size (B, T), owner (B, H*W)");
  TORCH_CHECK_TYPE(owner.scalar_type() == at::kInt, "cait_cpu::atme_step: owner must be int32");
  TORCH_CHECK_VALUE(grid.size() == 2 && grid[0] > 0 && grid[1] > 0, "cait_cpu::atme_step: grid must be (H, W)");
  TORCH_CHECK_VALUE(block == 2 || block == 4, "cait_cpu::atme_step: block must be 2 or 4");
  for (const at::Tensor* t : {&x, &metric, &size, &owner}) TORCH_CHECK_VALUE(t->device().is_cpu(), "cait_cpu::atme_step: CPU tensors only");
  const int64_t batch = x.size(0), tokens = x.size(1), n = tokens - prefix, cells = grid[0] * grid[1];
  const int64_t blocks = ((grid[0] + block - 1) / block) * ((grid[1] + block - 1) / block);
  TORCH_CHECK_VALUE(metric.size(0) == batch && metric.size(1) == tokens && size.size(0) == batch && size.size(1) == tokens,
                    "cait_cpu::atme_step: metric and size must have x's batch and token counts");
  TORCH_CHECK_VALUE(owner.size(0) == batch && owner.size(1) == cells, "cait_cpu::atme_step: owner must be (B, H*W)");
  TORCH_CHECK_VALUE(0 <= prefix && blocks <= n && n <= cells, "cait_cpu::atme_step: prefix and token count do not fit the grid");
  TORCH_CHECK_VALUE(0 <= r && r <= n - blocks, "cait_cpu::atme_step: r must lie in [0, N - blocks]");
  return n;
}

std::tuple<at::Tensor&, at::Tensor&, at::Tensor&> atme_step_out(const at::Tensor& x_in, const at::Tensor& metric_in, const at::Tensor& size_in,
                                                                const at::Tensor& owner_in, int64_t r, at::IntArrayRef grid, int64_t prefix,
                                                                int64_t block, at::Tensor& x_out, at::Tensor& size_out, at::Tensor& owner_out) {
  const int64_t n = check_inputs(x_in, metric_in, size_in, owner_in, r, grid, prefix, block);
  const int64_t batch = x_in.size(0), tokens = x_in.size(1), channels = x_in.size(2), cells = grid[0] * grid[1];
  auto check_out = [](const at::Tensor& out, const at::Tensor& like, at::IntArrayRef shape, const char* name) {
    TORCH_CHECK_VALUE(out.sizes() == shape && out.scalar_type() == like.scalar_type() && out.device().is_cpu() && out.is_contiguous(),
                      "cait_cpu::atme_step: ", name, " must be a contiguous CPU tensor of shape ", shape, " and dtype ", like.scalar_type());
  };
  check_out(x_out, x_in, {batch, tokens - r, channels}, "x_out");
  check_out(size_out, size_in, {batch, tokens - r}, "size_out");
  check_out(owner_out, owner_in, {batch, cells}, "owner_out");

  const at::Tensor x = x_in.contiguous(), metric = metric_in.contiguous(), size = size_in.contiguous(), owner = owner_in.contiguous();
  const int32_t* owner_data = owner.const_data_ptr<int32_t>();
  const auto [low, high] = std::minmax_element(owner_data, owner_data + batch * cells);
  TORCH_CHECK_VALUE(*low >= 0 && *high < n, "owner values must lie in [0, N) = [0, ", n, "), got min ", *low, " and max ", *high);

  std::vector<int64_t> labels(batch * n);
  const Grid g{grid[0], grid[1], block, n};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(), "atme_select", [&] {
    const scalar_t* data = metric.const_data_ptr<scalar_t>();
    const int64_t width = metric.size(2);
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        select_groups(data + (i * tokens + prefix) * width, width, owner_data + i * cells, g, r, labels.data() + i * n);
    });
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "atme_merge", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, size.scalar_type(), "atme_merge_size", [&] {
      const x_t* x_data = x.const_data_ptr<x_t>();
      const scalar_t* size_data = size.const_data_ptr<scalar_t>();
      x_t* x_out_data = x_out.mutable_data_ptr<x_t>();
      scalar_t* size_out_data = size_out.mutable_data_ptr<scalar_t>();
      int32_t* owner_out_data = owner_out.mutable_data_ptr<int32_t>();
      at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        std::vector<int64_t> scratch(3 * n);
        for (int64_t i = begin; i < end; ++i)
          merge_groups(x_data + i * tokens * channels, size_data + i * tokens, owner_data + i * cells, labels.data() + i * n, prefix, n,
                       channels, cells, x_out_data + i * (tokens - r) * channels, size_out_data + i * (tokens - r),
                       owner_out_data + i * cells, scratch.data());
      });
    });
  });
  return {x_out, size_out, owner_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> atme_step(const at::Tensor& x, const at::Tensor& metric, const at::Tensor& size,
                                                         const at::Tensor& owner, int64_t r, at::IntArrayRef grid, int64_t prefix,
                                                         int64_t block) {
  check_inputs(x, metric, size, owner, r, grid, prefix, block);
  const int64_t batch = x.size(0), tokens = x.size(1);
  at::Tensor x_out = at::empty({batch, tokens - r, x.size(2)}, x.options());
  at::Tensor size_out = at::empty({batch, tokens - r}, size.options());
  at::Tensor owner_out = at::empty({batch, owner.size(1)}, owner.options());
  atme_step_out(x, metric, size, owner, r, grid, prefix, block, x_out, size_out, owner_out);
  return {x_out, size_out, owner_out};
}

}  // namespace

// The schemas are defined in Python (cait_kernels/cpu_atme.py) when cait_kernels is imported, so a saved
// torch.export program naming cait_cpu::atme_step loads before this library is built; it adds the CPU kernels.
TORCH_LIBRARY_IMPL(cait_cpu, CPU, m) {
  m.impl("atme_step", &atme_step);
  m.impl("atme_step.out", &atme_step_out);
}
