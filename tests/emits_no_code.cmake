# Fails when a translation unit that only includes a fasterai header defines a fasterai symbol:
# functions, vtables, typeinfo, guard variables (nm types T t W w V v u). Including a header may
# cost the parsing, never the code generation of what the includer does not call. The usual
# cause is a virtual function declared in its class without `inline` and defined `inline`
# after it: it is then the class's key function, so every includer compiles the vtable and all
# the virtual functions reach.
#   cmake -DNM=<nm> -DOBJECTS=<a file listing the header check's objects, one per line> -P emits_no_code.cmake
file(STRINGS "${OBJECTS}" objects)
list(LENGTH objects count)
if(count EQUAL 0)
  message(FATAL_ERROR "emits_no_code: ${OBJECTS} lists no object files")
endif()
set(found "")
foreach(object IN LISTS objects)
  if(NOT EXISTS "${object}")
    message(FATAL_ERROR "emits_no_code: ${object} is missing (build fasterai_header_check)")
  endif()
  execute_process(COMMAND ${NM} -C --defined-only ${object}
                  OUTPUT_VARIABLE symbols RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "emits_no_code: ${NM} failed on ${object}")
  endif()
  string(REGEX MATCHALL "[0-9a-f]+ [TtWwVvu] [^\n]*fasterai::[^\n]*" hits "${symbols}")
  list(LENGTH hits n)
  if(n GREATER 0)
    get_filename_component(name "${object}" NAME)
    list(GET hits 0 first)
    string(APPEND found "\n  ${name}: ${n} symbols, e.g. ${first}")
  endif()
endforeach()
if(found)
  message(FATAL_ERROR "emits_no_code: headers whose includers compile fasterai code:${found}")
endif()
message(STATUS "emits_no_code: ${count} header units define no fasterai symbol")
