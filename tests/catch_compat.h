// moelab tests: one include that works with Catch2 2.13 (Debian 12) and Catch2 3 (GPU machine).
// Use has_substr("...") as the matcher of REQUIRE_THROWS_WITH / REQUIRE_THAT.
#pragma once
#include <string>
#if __has_include(<catch2/catch_test_macros.hpp>)
#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
using Catch::Approx;
inline auto has_substr(const std::string& s) { return Catch::Matchers::ContainsSubstring(s); }
#else
#include <catch2/catch.hpp>
inline auto has_substr(const std::string& s) { return Catch::Contains(s); }
#endif
