// moelab tests: the Catch2 main. Catch2 3 brings its own (Catch2::Catch2WithMain); Catch2 2.13
// needs CATCH_CONFIG_MAIN in exactly one translation unit.
#if !__has_include(<catch2/catch_test_macros.hpp>)
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
#endif
