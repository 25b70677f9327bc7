#!/usr/bin/env python3
"""The state_dict fixtures of tests/io/ (fixtures.cpp), written by torch.save.

    python3 make_io_fixtures.py write DIR    # DIR/torch<version>_matrix.pt, and with PyTorch 2.x
                                            # the conjugate/negative views torch26_*.pt
    python3 make_io_fixtures.py check FILE   # FILE (written by fasterai::save_state_dict) holds
                                            # exactly the matrix; exits 1 otherwise

The checked-in files come from Debian 12's PyTorch 1.13 (/usr/bin/python3) and from Debian 13's
PyTorch 2.6 (the root of scripts/compat.sh), both run with DIR = this directory:
    python3 tests/data/files/make_io_fixtures.py write tests/data/files
    chroot /var/cache/fasterai/trixie-root env -i PATH=/usr/bin:/bin HOME=/root \\
        /usr/bin/python3 /tmp/make_io_fixtures.py write /tmp/out   # then copy the torch26_* files
The tests also run `write` and `check` with the Python oracle of the build (FASTERAI_PYTHON) when
there is one. tests/io/fixtures.cpp builds the same values in C++: change both together.
"""
import collections
import os
import sys

import torch

DTYPES = [  # (name, dtype): every dtype a state_dict holds
    ('float16', torch.float16), ('float32', torch.float32), ('float64', torch.float64),
    ('bfloat16', torch.bfloat16), ('complex64', torch.complex64),
    ('complex128', torch.complex128), ('bool', torch.bool), ('int8', torch.int8),
    ('int16', torch.int16), ('int32', torch.int32), ('int64', torch.int64),
    ('uint8', torch.uint8),
]


def base(name, dtype):
    """A 2x3 tensor of exactly representable values, the extremes of the integer types."""
    if dtype == torch.bool:
        return torch.tensor([[True, False, True], [False, False, True]])
    if dtype.is_complex:
        return torch.tensor([[1 + 2j, -3.5 - 0.25j, 0j], [1j, -1 + 0j, 2.5 + 8j]], dtype=dtype)
    if dtype.is_floating_point:
        return torch.tensor([[0.5, -1.25, 3.0], [-2.0, 1024.0, 0.015625]], dtype=dtype)
    info = torch.iinfo(dtype)
    return torch.tensor([[0, 1, info.max], [info.min, 7, info.max - 1]], dtype=dtype)


def matrix():
    """Per dtype: the tensor, views that share its storage (transposed, a row at an offset, every
    other column, a stride-0 expansion), a 0-dim tensor and a 0-element tensor."""
    d = collections.OrderedDict()
    for name, dtype in DTYPES:
        b = base(name, dtype)
        d[name] = b
        d[name + '_t'] = b.t()
        d[name + '_row'] = b[1]
        d[name + '_step'] = b[:, ::2]
        d[name + '_expand'] = b[0:1].expand(4, 3)
        d[name + '_scalar'] = b[1, 2].clone()
        d[name + '_empty'] = torch.zeros((0, 3), dtype=dtype)
    return d


def conjugate_views():
    """PyTorch 2.x writes a seventh _rebuild_tensor_v2 argument for these: {'conj': True},
    {'neg': True} or both. `plain` and `conj` share one storage."""
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    w = torch.tensor([[1 + 2j, -3 + 0.5j, 4j], [5 + 0j, -6 - 7j, 8 + 9j]], dtype=torch.complex128)
    conj = collections.OrderedDict([('plain', z), ('conj', z.conj()), ('conj_t', w.conj().t())])
    neg = collections.OrderedDict([('imag', z.conj().imag),            # neg, float32
                                   ('neg_int', torch._neg_view(torch.tensor([5, -7], dtype=torch.int32))),
                                   ('neg_uint8', torch._neg_view(torch.tensor([1, 200], dtype=torch.uint8))),
                                   ('conj_neg', z.clone().conj()._neg_view())])  # both keys
    assert conj['conj'].is_conj() and neg['imag'].is_neg() and neg['conj_neg'].is_conj()

    class Buffers(torch.nn.Module):  # a module whose buffer is a conjugate view
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1, bias=False)
            with torch.no_grad():
                self.lin.weight.copy_(torch.tensor([[0.5, -2.0]]))
            self.register_buffer('phase', w.conj())
    module = Buffers().state_dict()
    assert module['phase'].is_conj()
    return {'torch26_conj.pt': conj, 'torch26_neg.pt': neg, 'torch26_module_conj.pt': module}


def version_tag():
    major, minor = torch.__version__.split('.')[:2]
    return 'torch%s%s' % (major, minor)


def write(directory):
    os.makedirs(directory, exist_ok=True)
    torch.save(matrix(), os.path.join(directory, version_tag() + '_matrix.pt'))
    if int(torch.__version__.split('.')[0]) >= 2:
        for name, d in conjugate_views().items():
            torch.save(d, os.path.join(directory, name))


def same(a, b):
    return (a.dtype == b.dtype and a.shape == b.shape and
            bool((a.view(torch.uint8) if a.dtype == torch.bool else a).eq(
                 (b.view(torch.uint8) if b.dtype == torch.bool else b)).all()))


def check(path):
    kwargs = {'weights_only': True} if 'weights_only' in torch.load.__code__.co_varnames else {}
    got = torch.load(path, **kwargs)
    want = matrix()
    problems = []
    if list(got.keys()) != list(want.keys()):
        problems.append('keys %s, expected %s' % (list(got.keys()), list(want.keys())))
    for key, expected in want.items():
        if key in got and not same(got[key], expected):
            problems.append('%s: %s, expected %s' % (key, got[key], expected))
    for p in problems:
        print('make_io_fixtures.py check %s: %s' % (path, p), file=sys.stderr)
    return 1 if problems else 0


if __name__ == '__main__':
    if len(sys.argv) != 3 or sys.argv[1] not in ('write', 'check'):
        sys.exit(__doc__)
    if sys.argv[1] == 'write':
        write(sys.argv[2])
    else:
        sys.exit(check(sys.argv[2]))
