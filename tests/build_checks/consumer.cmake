# Builds and runs a consumer project of slimgrad. MODE=find_package installs slimgrad into
# WORK/prefix first; MODE=add_subdirectory points the consumer at the source tree.
file(REMOVE_RECURSE ${WORK})
set(consumer ${SOURCE}/tests/consumers/${MODE})
if(MODE STREQUAL "find_package")
  execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE} -B ${WORK}/slimgrad -DSLIMGRAD_BUILD_TESTS=OFF
                          -DSLIMGRAD_BUILD_TOOLS=OFF -DSLIMGRAD_BUILD_BENCH=OFF
                          -DSLIMGRAD_BUILD_EXAMPLES=OFF -DCMAKE_INSTALL_PREFIX=${WORK}/prefix
                  COMMAND_ERROR_IS_FATAL ANY)
  execute_process(COMMAND ${CMAKE_COMMAND} --install ${WORK}/slimgrad COMMAND_ERROR_IS_FATAL ANY)
  set(extra -DCMAKE_PREFIX_PATH=${WORK}/prefix)
else()
  set(extra -DSLIMGRAD_SOURCE_DIR=${SOURCE})
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -S ${consumer} -B ${WORK}/build ${extra}
                COMMAND_ERROR_IS_FATAL ANY)
execute_process(COMMAND ${CMAKE_COMMAND} --build ${WORK}/build COMMAND_ERROR_IS_FATAL ANY)
execute_process(COMMAND ${WORK}/build/consumer RESULT_VARIABLE rc OUTPUT_VARIABLE out)
message(STATUS "${out}")
if(NOT rc EQUAL 0 OR NOT out MATCHES "consumer ok")
  message(FATAL_ERROR "consumer (${MODE}) failed: rc=${rc}")
endif()
