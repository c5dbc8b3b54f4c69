// What every ISA translation unit includes *before* its target pragma, so that no standard or
// shared header gets compiled for a wider ISA than the baseline (see ../kernels.h).
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>

#include "../../common/dropout.h"
#include "../kernels.h"
