# shiftaddvit: the CUDA backend (included at the end of CMakeLists.txt).
#
# Enabled when a CUDA compiler is found (SAV_CUDA, default ON then). Builds:
#   shiftadd_cuda    static library: src/ops/cuda/*.cu + src/models/vit_cuda.cu, sm_90 (H100/H200) by default
#   sav_cuda_tests   GoogleTest suite tests/cuda/test_*.cpp, registered in ctest; every GPU test skips
#                    ("no CUDA device") on machines with nvcc but no GPU, so it builds and passes there
#   sav_cuda_bench   tools/sav_cuda_bench.cpp: engine latency of the DeiT and PVTv2 presets (scripts/h200_bench.sh)
#   sav_shift_bench  tools/sav_shift_bench.cpp: the three GPU paths of a shift linear (cuBLASLt on decoded weights,
#                    packed-mma, int shift-add) on the DeiT linear shapes
# and links the library into the shiftaddvit program (its --device cuda).
# Other architectures: -DCMAKE_CUDA_ARCHITECTURES=80;90 (each one adds compile time).
include(CheckLanguage)
check_language(CUDA)
if(CMAKE_CUDA_COMPILER)
  option(SAV_CUDA "Build the CUDA backend (shiftadd_cuda, sav_cuda_tests, sav_cuda_bench)" ON)
else()
  option(SAV_CUDA "Build the CUDA backend (shiftadd_cuda, sav_cuda_tests, sav_cuda_bench)" OFF)
endif()

if(SAV_CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    message(FATAL_ERROR "SAV_CUDA=ON but no CUDA compiler was found (set CMAKE_CUDA_COMPILER or -DSAV_CUDA=OFF)")
  endif()
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
    set(CMAKE_CUDA_ARCHITECTURES 90)
  endif()
  if(NOT DEFINED CMAKE_CUDA_HOST_COMPILER AND CMAKE_CXX_COMPILER)
    set(CMAKE_CUDA_HOST_COMPILER ${CMAKE_CXX_COMPILER})
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "shiftaddvit: CUDA backend ON (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, archs ${CMAKE_CUDA_ARCHITECTURES})")

  # C++20 in .cu files too (CMake takes CUDA_STANDARD from CXX_STANDARD). CMake 3.25 does not know
  # nvcc's C++20 flag: supply it.
  if(NOT CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  set(CMAKE_CUDA_EXTENSIONS OFF)
  set(CMAKE_CUDA_FLAGS_RELEASE "-O3 -DNDEBUG")

  file(GLOB SAV_CUDA_SOURCES CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/src/ops/cuda/*.cu)
  add_library(shiftadd_cuda STATIC ${SAV_CUDA_SOURCES} ${CMAKE_SOURCE_DIR}/src/models/vit_cuda.cu
              ${CMAKE_SOURCE_DIR}/src/models/pvt_cuda.cu ${CMAKE_SOURCE_DIR}/src/models/cuda_model.cu
              ${CMAKE_SOURCE_DIR}/src/models/gpu_model.cu
              ${CMAKE_SOURCE_DIR}/src/models/vit_cuda_train.cu ${CMAKE_SOURCE_DIR}/src/models/cuda_train_core.cu
              ${CMAKE_SOURCE_DIR}/src/models/pvt_cuda_train.cu)
  # The directory's add_compile_options (-Wall ...) are host-compiler flags: hand them to nvcc through
  # -Xcompiler for .cu files, keep them as they are for C++ files.
  get_target_property(_sav_dir_opts shiftadd_cuda COMPILE_OPTIONS)
  set(_sav_cuda_opts "")
  if(_sav_dir_opts)
    foreach(_o ${_sav_dir_opts})
      list(APPEND _sav_cuda_opts "$<$<COMPILE_LANGUAGE:CXX>:${_o}>")
      # -Xcompiler splits its argument at commas: pass "-fsanitize=address,undefined" as one flag per value.
      if(_o MATCHES "^(-[^=]+=)(.*,.*)$")
        set(_key "${CMAKE_MATCH_1}")
        string(REPLACE "," ";" _vals "${CMAKE_MATCH_2}")
        foreach(_v ${_vals})
          list(APPEND _sav_cuda_opts "$<$<COMPILE_LANGUAGE:CUDA>:SHELL:-Xcompiler ${_key}${_v}>")
        endforeach()
      else()
        list(APPEND _sav_cuda_opts "$<$<COMPILE_LANGUAGE:CUDA>:SHELL:-Xcompiler ${_o}>")
      endif()
    endforeach()
  endif()
  set_target_properties(shiftadd_cuda PROPERTIES COMPILE_OPTIONS "${_sav_cuda_opts}"
                                                 CUDA_SEPARABLE_COMPILATION OFF POSITION_INDEPENDENT_CODE ON)
  target_link_libraries(shiftadd_cuda PUBLIC shiftadd CUDA::cudart CUDA::cublas CUDA::cublasLt)

  if(SAV_BUILD_TESTS)
    file(GLOB SAV_CUDA_TEST_SOURCES CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/cuda/test_*.cpp
         ${CMAKE_SOURCE_DIR}/tests/cuda/test_*.cu)
    add_executable(sav_cuda_tests ${SAV_CUDA_TEST_SOURCES})
    target_link_libraries(sav_cuda_tests PRIVATE shiftadd_cuda GTest::gtest_main)
    target_include_directories(sav_cuda_tests PRIVATE ${CMAKE_SOURCE_DIR}/tests)
    target_compile_definitions(sav_cuda_tests PRIVATE SAV_TEST_DATA="${CMAKE_SOURCE_DIR}/tests")
    gtest_discover_tests(sav_cuda_tests DISCOVERY_TIMEOUT 60 PROPERTIES TIMEOUT 900)
  endif()

  # the command-line program's --device cuda
  target_link_libraries(shiftaddvit PRIVATE shiftadd_cuda)
  target_compile_definitions(shiftaddvit PRIVATE SAV_HAVE_CUDA=1)

  add_executable(sav_cuda_bench ${CMAKE_SOURCE_DIR}/tools/sav_cuda_bench.cpp)
  target_link_libraries(sav_cuda_bench PRIVATE shiftadd_cuda)

  add_executable(sav_shift_bench ${CMAKE_SOURCE_DIR}/tools/sav_shift_bench.cpp)
  target_link_libraries(sav_shift_bench PRIVATE shiftadd_cuda)
endif()
