// moelab: which assignments an over-full expert drops (router.drop_policy). Its own header so
// that the backend interface (core/backend.h), which takes it, does not include the MoE
// config above it.
#pragma once

namespace moelab {

enum class DropPolicy { Position, Probs };  // later tokens first, or the lowest probabilities

}  // namespace moelab
